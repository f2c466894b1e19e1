"""One `strata demo` run: start the fleet, follow its rounds, read what only the live fleet can tell, stop, report."""

from __future__ import annotations

import json
import sys
import time

from proto.errors import StrataError
from strata.demo.fleet import DemoOptions, Fleet
from strata.demo.follow import Evaluate, Follower, RoundResult
from strata.demo.observe import indexed_lineage, relay_counters
from strata.demo.reference import REFERENCE_BATCH, REFERENCE_TASKS, BackgroundReference, Reference
from strata.demo.report import Observed, summarize, summary_text


def run_demo(options: DemoOptions, *, as_json: bool) -> int:
    out = sys.stderr if as_json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    fleet = Fleet(options, say=say)
    started = time.monotonic()
    try:
        fleet.prepare()
        # the centralized reference trains in a thread while the fleet boots (digits only: on
        # MNIST's 60k images it would take minutes)
        reference = (
            BackgroundReference(options.task, fleet.agent_task_options(), fleet.round_config(), rounds=options.rounds)
            if options.task in REFERENCE_TASKS
            else None
        )
        follower = Follower(
            fleet, evaluate=_evaluator(options.task), reference=reference.result if reference else None, say=say
        )
        fleet.start()
        if reference is not None:
            fleet.say(_reference_line(reference.result()))
        follower.follow()
        final = follower.final()
        observed = _observe(fleet, final)
    finally:
        say("\nstopping the fleet …")
        fleet.stop()
    summary = summarize(fleet, follower.results, final, observed)
    summary["centralized"] = reference.result().to_json() if reference is not None else None
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["dashboard"] = fleet.dashboard_url or None
    say(summary_text(fleet, final, summary))
    if as_json:
        json.dump(summary, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    return 0


def _reference_line(reference: Reference) -> str:
    return (
        f"centralized   reference: the same model trained on the union of the agents' {reference.samples} samples, "
        f"{reference.epochs_per_round} epochs a round in batches of {REFERENCE_BATCH}, ends at "
        f"{reference.accuracy[-1]:.3f} ({reference.seconds} s)"
    )


def _evaluator(task_name: str) -> Evaluate:
    from agent.tasks import builtin_task  # lazy: torch loads while the coordinator boots

    return builtin_task(task_name).evaluate_global


def _observe(fleet: Fleet, final: RoundResult) -> Observed:
    """What the daemons answer only while they run: the coordinator's index and the relay's counters."""
    indexed = indexed_lineage(fleet.coordinator_address, final.model, channel_factory=fleet.channels) if fleet.coordinator_address else None
    relay: dict = {}
    if fleet.relay is not None:
        try:
            relay = relay_counters(fleet.relay.metrics_address)
        except StrataError as exc:
            relay = {"error": str(exc)}
    return Observed(indexed=indexed, relay=relay)
