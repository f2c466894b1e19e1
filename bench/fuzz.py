"""The long fuzz run: at least 10,000 fuzzed calls on every RPC of a live coordinator, aggregator and
relay, each a real `strata ... serve` process, then what they did with them.

    python bench/fuzz.py                 # 10,000 calls, about 3 minutes on a quiet 2-core machine
    python bench/fuzz.py --calls 500     # a smoke run
    python bench/fuzz.py --seed 7        # another draw (the default seed replays the README's run)

The cases come from tests/fuzz (descriptor-driven: valid, mutated, garbage,
boundary values, hostile encodings, broken chunk streams, updates forged
against the real base). Reported: calls and messages per RPC, the status
histogram per daemon, findings (UNKNOWN/INTERNAL, replies over the limit,
accepted updates), crashes, health and a normal Join/GetRing afterwards,
tracebacks in each daemon's log, and each daemon's RSS before and after each
of `--rounds` equal parts of the run (growth that keeps going part after part
is a leak; growth that stops is the allocator's high-water mark).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from _common import print_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000, help="fuzzed calls in all (spread evenly over every RPC)")
    parser.add_argument("--seed", type=int, default=20260501)
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per daemon")
    parser.add_argument("--stream-idle-s", type=float, default=2.0, help="the daemons' stream idle limit")
    parser.add_argument("--rounds", type=int, default=4, help="parts of the run, with each daemon's RSS after each")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from proto import strata_pb2 as pb
    from proto import strata_pb2_grpc as pb_grpc
    from proto.wire import create_channel
    from tests.fuzz import fetch_base
    from tests.fuzz.cases import CaseFactory
    from tests.fuzz.fleet import ProcessFleet
    from tests.fuzz.runner import BAD_CODES, Tally, run
    from tests.fuzz.streams import UpdateForger, chunk_framing, signed_manifests

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="strata-fuzz-") as tmp:
        fleet = ProcessFleet(Path(tmp), stream_idle_s=args.stream_idle_s)
        try:
            daemons = fleet.start()
            print(f"fleet up in {time.monotonic() - started:.1f} s: " + ", ".join(f"{d.name} {d.address} pid {d.process.pid}" for d in daemons.values()))
            rss = {name: [d.rss_mb()] for name, d in daemons.items()}
            base = fetch_base(daemons["aggregator"].address)
            seeds = [base.model_cid, "digits", "agg-fuzz", "relay-fuzz", daemons["aggregator"].address, "h:1", "local"]
            byte_seeds = signed_manifests(base)
            framing = chunk_framing(pb.UpdateChunk.DESCRIPTOR)
            assert framing is not None
            factories = {}
            for name, daemon in daemons.items():
                rng = random.Random(f"{args.seed}:{name}")
                forgers = {}
                if "strata.v1.AgentService" in daemon.services:
                    forgers["/strata.v1.AgentService/SubmitUpdate"] = UpdateForger(fetch_base(daemon.address), framing, rng)
                factories[name] = CaseFactory(rng, seeds=seeds, byte_seeds=byte_seeds, stall_s=args.stream_idle_s + 1.0, forgers=forgers)
            rpc_count = sum(len(d.target.rpcs()) for d in daemons.values())
            per_rpc = math.ceil(args.calls / rpc_count)
            parts = [per_rpc // args.rounds + (1 if i < per_rpc % args.rounds else 0) for i in range(args.rounds)]
            log_before = {name: len(d.log_lines()) for name, d in daemons.items()}
            tallies = {name: Tally() for name in daemons}

            async def attack() -> None:
                # one event loop for the whole run: grpc.aio does not outlive the loop it first ran on
                for count in parts:
                    await asyncio.gather(
                        *(
                            run(d.address, factories[n].cases(d.target.rpcs(), count), concurrency=args.concurrency,
                                tally=tallies[n], learn=factories[n].learn)
                            for n, d in daemons.items()
                        )
                    )  # fmt: skip
                    for name, daemon in daemons.items():
                        rss[name].append(daemon.rss_mb() if daemon.process.alive else float("nan"))

            fuzz_started = time.monotonic()
            asyncio.run(attack())
            fuzz_s = time.monotonic() - fuzz_started

            alive = {name: d.process.alive for name, d in daemons.items()}
            healthy, answers = {}, {}
            for name, daemon in daemons.items():
                try:
                    with create_channel(daemon.address) as channel:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                        healthy[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
                        if name == "coordinator":
                            ring = pb_grpc.CoordinatorServiceStub(channel).GetRing(pb.GetRingRequest(), timeout=10)
                            answers[name] = f"GetRing v{ring.version}, {len(ring.members)} members"
                        else:
                            joined = pb_grpc.AgentServiceStub(channel).Join(pb.JoinRequest(agent_id="after-the-fuzz", federation="digits"), timeout=10)
                            answers[name] = f"Join -> {joined.WhichOneof('outcome')}"
                except grpc.RpcError as exc:
                    healthy.setdefault(name, False)
                    answers[name] = f"failed: {exc.code().name}"
            accepted = fleet.accepted_updates()
            logs = {name: d.log_lines()[log_before[name]:] for name, d in daemons.items()}
        finally:
            fleet.stop()

    report(args, daemons, tallies, rss, alive, healthy, answers, accepted, logs, fuzz_s, BAD_CODES)
    clean = all(alive.values()) and all(healthy.values()) and sum(accepted.values()) == 0
    clean = clean and all(t.finding_count == 0 for t in tallies.values())
    print("\nverdict:", "clean" if clean else "FINDINGS (see above)")
    return 0


def report(args, daemons, tallies, rss, alive, healthy, answers, accepted, logs, fuzz_s, bad_codes) -> None:  # noqa: ANN001, PLR0913
    total_calls = sum(sum(t.calls.values()) for t in tallies.values())
    total_messages = sum(sum(t.messages.values()) for t in tallies.values())
    print(f"\n{total_calls} calls ({total_messages} request messages) in {fuzz_s:.0f} s, seed {args.seed}\n")
    rows = []
    for name, tally in tallies.items():
        for rpc in sorted(tally.calls):
            statuses = sorted(((s, c) for (p, s), c in tally.statuses.items() if p == rpc), key=lambda sc: -sc[1])
            rows.append([name, rpc.rsplit("/", 1)[1], tally.calls[rpc], tally.messages[rpc], ", ".join(f"{s} {c}" for s, c in statuses)])
    print_table(["daemon", "rpc", "calls", "messages", "statuses"], rows)
    print()
    for name, tally in tallies.items():
        print(f"{name}: " + ", ".join(f"{s} {c}" for s, c in tally.histogram().most_common()))
    print()
    summary = []
    for name, tally in tallies.items():
        events = logs[name]
        tracebacks = sum(1 for e in events if "exc" in e)
        errors = sum(1 for e in events if e.get("level") in ("error", "critical"))
        bad = sum(tally.histogram()[code] for code in bad_codes)
        summary.append([
            name, sum(tally.calls.values()), bad, tally.finding_count, accepted.get(name, "-"),
            "yes" if alive[name] else "CRASHED", "yes" if healthy.get(name) else "NO", answers.get(name, "-"),
            tracebacks, errors, len(events), " / ".join(f"{v:.0f}" for v in rss[name]), f"{rss[name][-1] - rss[name][0]:+.0f}",
        ])  # fmt: skip
    print_table(
        ["daemon", "calls", "UNKNOWN/INTERNAL", "findings", "accepted", "alive", "healthy", "after", "tracebacks",
         "errors", "log lines", f"RSS MiB: before / after each of {args.rounds} parts", "growth"],
        summary,
    )  # fmt: skip
    for name, tally in tallies.items():
        for finding in tally.findings[:10]:
            print(f"FINDING {name} {finding.rpc} {finding.kind} -> {finding.status} {finding.details[:160]!r} bytes={finding.sample}")
    for name, events in logs.items():
        for event in [e for e in events if "exc" in e][:3]:
            print(f"TRACEBACK {name}: {event.get('event')}\n{event['exc'][-1500:]}")


if __name__ == "__main__":
    sys.exit(main())
