"""Faults at size, in network namespaces: one aggregator cut off mid-round, then another killed with -9.

Run alone, as root: `python bench/partition.py` (`--quick` for a smoke run: 200
devices, a 15 s cut, 300 devices on the killed aggregator).

A coordinator and 3 aggregators run as `strata` processes, each in its own network
namespace on one private bridge (tests/netns.py); `strata simulate` runs in the root
namespace and reaches them over the bridge, as devices reach servers over a network.

1. **Cut.** `--agents` virtual devices with the cheap trainer (noise) train rounds
   on all three. Once each aggregator closed 2 rounds, the one holding the most
   devices is unplugged (its bridge port down: no FIN, no RST) for `--cut-s`
   seconds, mid-round, then plugged back in. Reported: the rounds the others closed
   during the cut, how many devices left it and when, that after healing it is on
   the coordinator's ring again, gets its devices back and closes rounds again
   (its round number and the peers its semi-global models blend).
2. **Kill.** More devices join with no trainer (connected, watching, heartbeating)
   until one aggregator holds `--kill-devices` of them, ids chosen from the
   coordinator's ring so that it does. It is killed with SIGKILL. Reported: the time
   until the last of its devices joined a survivor, and the Join rate the
   survivors saw (their `strata_aggregator_joins_total`, scraped every 0.25 s):
   peak over any 1 s window against the mean over the re-homing, and the share of
   the devices that joined in the peak second.
3. **Nothing acknowledged is lost.** Every update the simulator saw acknowledged
   (`strata simulate --receipts`) must be in the journal of an aggregator, and
   every one counted in a round that closed must be a parent of a cluster model
   in the coordinator's index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from _common import print_table

from agent.sim import SimOptions
from agent.sim.schedule import agent_id
from tests.netns import NetnsFleet, NetnsLab, SimProgress, netns_unavailable
from tests.procs import ProcessFactory, StrataProcess

SAMPLE_S = 0.25


# ---------------------------------------------------------------- watching the fleet


@dataclass
class Watch:
    """Every SAMPLE_S: each aggregator's counters (None while it does not answer) and each simulator's progress."""

    fleet: NetnsFleet
    sims: list[SimProgress] = field(default_factory=list)
    samples: list[tuple[float, str, dict[str, float] | None]] = field(default_factory=list)
    skip: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Watch:
        threading.Thread(target=self._run, name="watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for sim in list(self.sims):
                sim.poll()
            for name in self.fleet.names:
                if name in self.skip:
                    continue
                metrics = self.fleet.metrics(name, timeout=1.0)
                values = None
                if metrics is not None:
                    values = {
                        key: metrics.value(f"strata_aggregator_{key}")
                        for key in ("rounds_closed_total", "round", "joins_total", "active_agents", "ring_members")
                    }
                self.samples.append((time.monotonic(), name, values))

    def latest(self, name: str) -> dict[str, float] | None:
        for _, who, values in reversed(self.samples):
            if who == name and values is not None:
                return values
        return None

    def at(self, name: str, when: float) -> dict[str, float] | None:
        """The last answer `name` gave at or before `when`."""
        found = None
        for at, who, values in self.samples:
            if at > when:
                break
            if who == name and values is not None:
                found = values
        return found

    def homes(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for sim in self.sims:
            total.update(sim.homes)
        return total


def wait_until(what: str, check, timeout: float, poll: float = 0.5) -> float:  # noqa: ANN001
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - started


def start_sim(fleet: NetnsFleet, procs: ProcessFactory, root: Path, name: str, *args: str) -> StrataProcess:
    return procs.spawn(
        ["simulate", "--seeds", ",".join(fleet.seeds), "--progress", "0.5", "--json",
         "--receipts", str(root / f"{name}.receipts.jsonl"), *args],
        name=name,
        home=fleet.home,
    )


def stop_sim(process: StrataProcess, root: Path, name: str) -> tuple[dict, list[dict]]:
    """SIGINT (it reports and writes its receipts), then its --json report and receipts."""
    if process.alive:
        os.kill(process.pid, signal.SIGINT)
    process.wait_exit(timeout=180)
    report = json.loads(process.stdout())
    receipts_path = root / f"{name}.receipts.jsonl"
    receipts = [json.loads(line) for line in receipts_path.read_text().splitlines()] if receipts_path.exists() else []
    return report, receipts


# ---------------------------------------------------------------- the scenario


def run(args: argparse.Namespace, root: Path) -> dict:
    out: dict = {"agents": args.agents, "cut_s": args.cut_s, "kill_devices": args.kill_devices}
    procs = ProcessFactory(root / "procs")
    lab = NetnsLab().open()
    watch: Watch | None = None
    try:
        fleet = NetnsFleet(
            lab,
            procs,
            root,
            aggregator_settings={
                "serving": {"heartbeat_interval_s": args.heartbeat_s},
                "round": {"quorum": 0.8, "deadline_s": args.deadline_s, "min_updates": 1},
            },
        ).start()
        say(f"fleet: coordinator {fleet.coordinator_address}, aggregators {', '.join(fleet.seeds)} ({lab.subnet})")
        watch = Watch(fleet).start()

        # -------- 1. the cut
        ring = fleet.ring()
        options = SimOptions(agents=args.agents, id_prefix="dev")
        planned = Counter(ring.owner(agent_id(options, i)).id for i in range(args.agents))
        victim = planned.most_common(1)[0][0]
        survivors = [n for n in fleet.names if n != victim]
        out["planned_homes"] = dict(planned)
        trainers = start_sim(
            fleet, procs, root, "sim-train", "--agents", str(args.agents), "--trainer", "noise", "--id-prefix", "dev",
            "--seed", "1",
        )
        watch.sims.append(SimProgress(trainers))
        say(f"{args.agents} training devices joining; waiting for 2 closed rounds everywhere …")
        wait_until(
            "2 closed rounds on every aggregator",
            lambda: all((watch.latest(n) or {}).get("rounds_closed_total", 0) >= 2 for n in fleet.names),
            timeout=300,
        )
        before = {n: watch.latest(n) for n in fleet.names}
        devices_before = watch.homes()[victim]
        say(f"cutting {victim} off ({devices_before} devices there) for {args.cut_s:.0f} s")
        victim_log_mark = fleet.aggregators[victim].event_count()
        fleet.cut(victim)
        watch.skip.add(victim)
        cut_at = time.monotonic()
        time.sleep(args.cut_s)
        during = {n: watch.latest(n) for n in survivors}
        devices_at_victim_min = min(
            (homes.get(victim, 0) for at, homes in watch.sims[0].history if at >= cut_at), default=devices_before
        )
        first_left_at = next(
            (at - cut_at for at, homes in watch.sims[0].history if at >= cut_at and homes.get(victim, 0) < devices_before),
            None,
        )
        left_at = next(
            (at - cut_at for at, homes in watch.sims[0].history if at >= cut_at and homes.get(victim, 0) == 0), None
        )
        ring_during = fleet.ring_members()
        fleet.heal(victim)
        watch.skip.discard(victim)
        say(f"healed {victim}; waiting for it to rejoin the ring, get devices back and close 2 rounds …")
        rejoin_s = wait_until("the ring to hold all 3 again", lambda: fleet.ring_members() == set(fleet.names), timeout=120)
        back_s = wait_until("devices to come back to the victim", lambda: watch.homes()[victim] > 0, timeout=180)
        wait_until("the victim to answer metrics", lambda: fleet.metrics(victim) is not None, 60)
        rounds_at_heal = fleet.metrics(victim).value("strata_aggregator_rounds_closed_total")
        wait_until(
            "the victim to close 2 rounds after healing",
            lambda: (watch.latest(victim) or {}).get("rounds_closed_total", 0) >= rounds_at_heal + 2,
            timeout=240,
        )
        after = {n: watch.latest(n) for n in fleet.names}
        synthesized = [
            e for e in fleet.aggregators[victim].events()[victim_log_mark:] if e["event"] == "semi_global_synthesized"
        ]
        out["cut"] = {
            "victim": victim,
            "devices_before": devices_before,
            "devices_at_victim_min_during_cut": devices_at_victim_min,
            "first_left_after_s": None if first_left_at is None else round(first_left_at, 1),
            "all_left_after_s": None if left_at is None else round(left_at, 1),
            "ring_during_cut": sorted(ring_during or []),
            "survivor_rounds_closed_during_cut": {
                n: int(during[n]["rounds_closed_total"] - before[n]["rounds_closed_total"]) for n in survivors
            },
            "survivor_joins_during_cut": {n: int(during[n]["joins_total"] - before[n]["joins_total"]) for n in survivors},
            "victim_round": {"before_cut": before[victim]["round"], "after_heal": after[victim]["round"]},
            "survivor_rounds": {n: {"before_cut": before[n]["round"], "after_heal": after[n]["round"]} for n in survivors},
            "ring_again_after_s": round(rejoin_s, 1),
            "devices_back_after_s": round(rejoin_s + back_s, 1),
            "devices_at_victim_after": watch.homes()[victim],
            "victim_semi_globals_after_heal": [
                {"round": e.get("round"), "peers_used": e.get("peers_used")} for e in synthesized
            ][-4:],
        }
        say(json.dumps(out["cut"]))

        # -------- 2. the kill
        if args.kill_devices:
            ring = fleet.ring()
            current = Counter(ring.owner(agent_id(options, i)).id for i in range(args.agents))
            idle_options = SimOptions(agents=1, id_prefix="idle")
            needed: dict[str, int] = {}
            for name in fleet.names:
                count, index = current[name], 0
                while count < args.kill_devices and index < 50_000:
                    count += ring.owner(agent_id(idle_options, index)).id == name
                    index += 1
                needed[name] = index
            target = min(needed, key=needed.get)
            idle = needed[target]
            survivors = [n for n in fleet.names if n != target]
            holding = current[target] + sum(ring.owner(agent_id(idle_options, i)).id == target for i in range(idle))
            say(f"{idle} idle devices joining so that {target} holds {holding} …")
            idlers = start_sim(
                fleet, procs, root, "sim-idle", "--agents", str(idle), "--trainer", "none", "--id-prefix", "idle",
                "--seed", "2",
            )
            watch.sims.append(SimProgress(idlers))
            wait_until(
                f"{holding} devices on {target}",
                lambda: watch.homes()[target] >= holding and watch.sims[1].online >= idle,
                timeout=120 + idle / 100,
            )
            time.sleep(args.heartbeat_s * 2)  # every device heartbeated since it joined
            held = watch.homes()[target]
            joins_before = {n: watch.latest(n)["joins_total"] for n in survivors}
            say(f"kill -9 {target} holding {held} devices")
            fleet.aggregators[target].kill9()
            watch.skip.add(target)
            killed_at = time.monotonic()
            rehome_s = wait_until("every device of the killed aggregator to re-home", lambda: watch.homes()[target] == 0, 180, 0.1)
            time.sleep(3.0)
            rates = join_rates([(at, who, v) for at, who, v in watch.samples if who in survivors and at >= killed_at - 2])
            joins_after = {n: watch.latest(n)["joins_total"] for n in survivors}
            rehomed = sum(joins_after[n] - joins_before[n] for n in survivors)
            peak_at, peak = max(rates, key=lambda r: r[1]) if rates else (killed_at, 0.0)
            out["kill"] = {
                "victim": target,
                "devices_held": held,
                "idle_devices_added": idle,
                "rehome_s": round(rehome_s, 1),
                "survivor_joins": int(rehomed),
                "peak_joins_per_s": round(peak, 0),
                "peak_at_s_after_kill": round(peak_at - killed_at, 1),
                "mean_joins_per_s_while_rehoming": round(rehomed / rehome_s, 0) if rehome_s else None,
                "peak_share_of_devices": round(peak / held, 3) if held else None,
                "rehoming_curve": rehoming_curve(watch, target, killed_at),
            }
            say(json.dumps(out["kill"]))

        # -------- 3. nothing acknowledged is lost
        watch.stop()
        reports = {}
        receipts: list[dict] = []
        for sim in watch.sims:
            name = sim.process.name
            reports[name], got = stop_sim(sim.process, root, name)
            receipts += got
        time.sleep(3.0)  # the last announcements reach the index
        journaled = fleet.journaled_updates()
        indexed = fleet.indexed_cluster_parents()
        acknowledged = {r["update_cid"] for r in receipts}
        missing_journal = acknowledged - set(journaled)
        closed_round = {n: (watch.latest(n) or after[n])["round"] for n in fleet.names}
        counted_in_closed = {
            cid for cid in acknowledged & set(journaled) if any(rnd < closed_round[name] for name, rnd in journaled[cid])
        }
        missing_index = counted_in_closed - set(indexed)
        out["acknowledged"] = {
            "receipts": len(receipts),
            "distinct_updates": len(acknowledged),
            "journaled": len(acknowledged & set(journaled)),
            "lost": len(missing_journal),
            "counted_in_closed_rounds": len(counted_in_closed),
            "in_index_lineage": len(counted_in_closed & set(indexed)),
            "missing_from_index": len(missing_index),
            "examples_lost": sorted(missing_journal)[:5],
            "examples_missing_from_index": sorted(missing_index)[:5],
        }
        out["simulators"] = {
            name: {k: report.get(k) for k in ("joined", "online_at_end", "counts", "errors", "refusals", "latency_ms")}
            for name, report in reports.items()
        }
        return out
    finally:
        if watch is not None:
            watch.stop()
        procs.stop_all(timeout=20)
        lab.close()


def join_rates(samples: list[tuple[float, str, dict | None]]) -> list[tuple[float, float]]:
    """(time, Joins per second over the second before it, summed over the survivors)."""
    by_name: dict[str, list[tuple[float, float]]] = {}
    for at, who, values in samples:
        if values is not None:
            by_name.setdefault(who, []).append((at, values["joins_total"]))
    rates: list[tuple[float, float]] = []
    reference = next(iter(by_name.values()), [])
    for at, _ in reference:
        total = 0.0
        for series in by_name.values():
            now = [v for t, v in series if t <= at]
            then = [(t, v) for t, v in series if t <= at - 1.0]
            if now and then:
                total += (now[-1] - then[-1][1]) / max(1e-9, at - then[-1][0])
        rates.append((at, total))
    return rates


def rehoming_curve(watch: Watch, target: str, killed_at: float) -> list[tuple[float, int]]:
    """(seconds after the kill, devices still on the dead aggregator), about once a second."""
    curve: list[tuple[float, int]] = []
    next_at = 0.0
    for at in sorted(t for sim in watch.sims for t, _ in sim.history):
        if at < killed_at:
            continue
        if at - killed_at >= next_at:
            still = sum(
                next((h.get(target, 0) for t, h in reversed(sim.history) if t <= at), 0) for sim in watch.sims
            )
            curve.append((round(at - killed_at, 1), still))
            next_at = curve[-1][0] + 1.0
            if still == 0:
                break
    return curve


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def render(result: dict) -> None:
    cut = result["cut"]
    print_table(
        ["phase", "victim", "devices on it", "others' rounds during cut", "left it", "ring again s", "devices back s",
         "victim round before -> after"],
        [[
            f"cut {result['cut_s']:.0f} s", cut["victim"], cut["devices_before"],
            ", ".join(f"{n} +{c}" for n, c in cut["survivor_rounds_closed_during_cut"].items()),
            f"{cut['devices_before'] - cut['devices_at_victim_min_during_cut']}"
            + (f" (all within {cut['all_left_after_s']} s)" if cut["all_left_after_s"] is not None else ""),
            cut["ring_again_after_s"], cut["devices_back_after_s"],
            f"{cut['victim_round']['before_cut']:.0f} -> {cut['victim_round']['after_heal']:.0f}",
        ]],
    )
    if "kill" in result:
        kill = result["kill"]
        print_table(
            ["phase", "victim", "devices on it", "re-homed s", "survivor Joins", "peak Joins/s", "mean Joins/s",
             "peak share"],
            [[
                "kill -9", kill["victim"], kill["devices_held"], kill["rehome_s"], kill["survivor_joins"],
                kill["peak_joins_per_s"], kill["mean_joins_per_s_while_rehoming"], kill["peak_share_of_devices"],
            ]],
        )
    ack = result["acknowledged"]
    print(
        f"acknowledged {ack['distinct_updates']} updates; journaled {ack['journaled']}; LOST {ack['lost']}; "
        f"counted in closed rounds {ack['counted_in_closed_rounds']}, in the index's lineage {ack['in_index_lineage']} "
        f"(missing {ack['missing_from_index']})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 devices, a 15 s cut, 300 devices on the killed one")
    parser.add_argument("--agents", type=int, default=2000, help="training devices (default: 2000)")
    parser.add_argument("--cut-s", type=float, default=60.0, help="how long the aggregator is cut off (default: 60)")
    parser.add_argument("--kill-devices", type=int, default=3000, help="devices on the aggregator killed (0: skip)")
    parser.add_argument("--deadline-s", type=float, default=15.0, help="the aggregators' round.deadline_s (default: 15)")
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="their serving.heartbeat_interval_s (default: 5)")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.cut_s, args.kill_devices = 200, 15.0, 300
    reason = netns_unavailable()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 0
    root = Path(tempfile.mkdtemp(prefix="strata-bench-partition-"))
    try:
        result = run(args, root)
    finally:
        if os.environ.get("STRATA_BENCH_KEEP"):
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    render(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True))
    return 1 if result["acknowledged"]["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
