"""`strata history` and `strata plot`: an aggregator's per-round record, read from its journal.

The journal lives in the aggregator's state directory (one per federation, in
`federations/NAME`, for an aggregator serving several). Without --state-dir these
commands look in ~/.strata/aggregator/* and ~/.strata/demo/aggregators/* (where
`strata demo` keeps its fleet), one table per aggregator found.

"accuracy" and "loss" are the round's base model as the agents saw it: each agent
evaluates the base it receives on its own held-out data and reports it with its
update; the journal keeps their sample-weighted mean.

Personalized evaluation, per round, of the model the round made (its next base, the
semi-global model when synthesis runs), side by side because synthesis trades one for
the other:
- "own_accuracy": its mean accuracy on the agents' own data, the mean over the agents that
  trained on it of what each reported for it (one agent, one vote: a sample count is a
  claim); known once the next round's updates arrive;
- "heldout_accuracy": its accuracy on the task's held-out split, measured by the aggregator
  when it runs with `evaluation: task:NAME` ("cluster_heldout_accuracy": the cluster model's).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aggregator.journal import Journal, RoundRecord
from intake.journal import AcceptedUpdate
from proto.errors import InvalidInput, NotFound
from strata import render
from strata.cli_common import EXIT_OK, add_json_option, print_json


def register(commands: argparse._SubParsersAction) -> None:
    history = commands.add_parser("history", help="an aggregator's per-round table, from its journal")
    _add_selection(history)
    add_json_option(history)
    history.set_defaults(handler=cmd_history)

    plot = commands.add_parser("plot", help="draw accuracy and loss per round (PNG)")
    _add_selection(plot)
    plot.add_argument("-o", "--output", type=Path, default=Path("accuracy.png"), help="output PNG (default: accuracy.png)")
    plot.set_defaults(handler=cmd_plot)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", action="append", default=[], metavar="ID", help="only this aggregator (repeatable)")
    parser.add_argument("--state-dir", type=Path, action="append", default=[], help="an aggregator state directory (repeatable)")


_JOURNAL = "journal.sqlite"


def find_state_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """aggregator id (``id/federation`` for an aggregator serving several) -> directory holding its journal."""
    if args.state_dir:
        found: dict[str, Path] = {}
        for state_dir in args.state_dir:
            journals = _journals(state_dir)
            if not journals:
                raise NotFound(f"no journal at {state_dir / _JOURNAL}", reason="not_found")
            found.update(journals)
    else:
        home = Path.home() / ".strata"
        found = {}
        for parent in (home / "aggregator", home / "demo" / "aggregators"):
            for state_dir in sorted(p for p in parent.glob("*") if p.is_dir()):
                found.update(_journals(state_dir))
    if args.aggregator:
        found = {k: v for k, v in found.items() if k in args.aggregator or k.split("/")[0] in args.aggregator}
    if not found:
        raise NotFound(
            "no aggregator journal found (looked in ~/.strata/aggregator and ~/.strata/demo/aggregators); "
            "pass --state-dir",
            reason="not_found",
        )
    return found


def _journals(state_dir: Path) -> dict[str, Path]:
    """The journals of one aggregator's state directory: its own, or one per federation it serves
    (`state_dir/federations/NAME`, named ``id/NAME``)."""
    if (state_dir / _JOURNAL).exists():
        return {state_dir.name: state_dir}
    return {
        f"{state_dir.name}/{journal.parent.name}": journal.parent
        for journal in sorted(state_dir.glob(f"federations/*/{_JOURNAL}"))
    }


def own_data_accuracy(updates: Iterable[AcceptedUpdate]) -> dict[str, float]:
    """Per base model CID: the mean over agents of the accuracy each reported for it on its own data."""
    reported: dict[str, dict[str, float]] = {}
    for update in updates:
        accuracy = update.base_metrics.get("accuracy")
        if isinstance(accuracy, int | float) and math.isfinite(accuracy):
            reported.setdefault(update.base_cid, {})[update.agent_id] = float(accuracy)
    return {cid: sum(by_agent.values()) / len(by_agent) for cid, by_agent in reported.items()}


def _rows(records: list[RoundRecord], own_accuracy: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    own_accuracy = own_accuracy or {}
    return [
        {
            "round": r.round,
            "participants": r.participants,
            "num_samples": r.num_samples,
            "accuracy": r.base_metrics.get("accuracy"),
            "loss": r.base_metrics.get("loss"),
            # the model this round made (its next base), on the agents' own data and on the held-out split
            "own_accuracy": own_accuracy.get(r.next_base_cid) if r.next_base_cid else None,
            "heldout_accuracy": (r.extra.get("heldout") or {}).get("accuracy"),
            "cluster_heldout_accuracy": (r.extra.get("cluster_heldout") or {}).get("accuracy"),
            "train_loss": r.metrics.get("loss"),
            "refusals": ",".join(f"{k}={v}" for k, v in sorted(r.refusals.items())) or None,
            "aggregation_s": r.aggregation_s,
            "cluster": r.cluster_cid,
            "next_base": r.next_base_cid,
            "next_base_kind": r.extra.get("next_base_kind"),
            # cumulative (ε, δ) after this round, when the federation runs with DP (None: no finite ε)
            "epsilon": (r.extra.get("privacy") or {}).get("epsilon"),
            "delta": (r.extra.get("privacy") or {}).get("delta"),
            "closed": r.closed_at is not None,
        }
        for r in records
    ]


def read_history(state_dir: Path) -> list[dict[str, Any]]:
    """An aggregator's per-round rows, as `strata history --json` prints them, read from the
    journal in its state directory (also while the aggregator writes it); NotFound if it has
    none yet. `strata demo` follows its fleet's rounds through this too."""
    path = state_dir / _JOURNAL
    if not path.exists():
        raise NotFound(f"no journal at {path}", reason="not_found")
    with Journal(path, readonly=True) as journal:
        return _rows(journal.history(), own_data_accuracy(journal.iter_all_updates()))


def load_histories(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    return {aggregator: read_history(state_dir) for aggregator, state_dir in find_state_dirs(args).items()}


def cmd_history(args: argparse.Namespace) -> int:
    histories = load_histories(args)
    if args.json:
        print_json(histories)
        return EXIT_OK
    for aggregator, rows in histories.items():
        print(f"== {aggregator}")
        columns = ["round", "participants", "num_samples", "accuracy", "loss", "train_loss", "own_accuracy"]
        if any(r["heldout_accuracy"] is not None for r in rows):
            columns.append("heldout_accuracy")
        columns += ["refusals", "aggregation_s"]
        if any(r["delta"] is not None for r in rows):
            columns.append("epsilon")
        print(render.table([r for r in rows if r["closed"]], [*columns, "next_base"]))
        print()
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    if args.output.suffix.lower() != ".png":
        raise InvalidInput("the plot is a PNG: -o must end in .png", reason="bad_argument")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = load_histories(args)
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for aggregator, rows in histories.items():
        closed = [r for r in rows if r["closed"] and r["accuracy"] is not None]
        rounds = [r["round"] for r in closed]
        accuracy_axis.plot(rounds, [r["accuracy"] for r in closed], marker="o", label=aggregator)
        loss_axis.plot(rounds, [r["loss"] for r in closed], marker="o", label=aggregator)
    accuracy_axis.set(title="base model accuracy (agents' held-out data)", xlabel="round", ylabel="accuracy")
    loss_axis.set(title="base model loss", xlabel="round", ylabel="loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")
    return EXIT_OK
