"""Memory under garbage: bytes that do not parse, sent to every RPC of each daemon, against a bare grpcio
thread-pool server with generated servicers measured in the same run.

    python bench/garbage_memory.py                    # 30,000 per daemon, about 4 minutes on 2 cores
    python bench/garbage_memory.py --messages 3000    # a smoke run

Each daemon (coordinator, aggregator, relay: real `strata ... serve`
processes) and the bare server (`grpc.server(ThreadPoolExecutor)` with the
generated AgentService, PeerService and CoordinatorService servicers, in its own
process) gets a warm-up of `--warmup` corrupt messages, then `--messages` more,
round-robin over its RPCs; every payload is checked to fail parsing as that
RPC's input type. Reported per server: how each was answered (INVALID_ARGUMENT
for unary and server-streaming RPCs; SubmitUpdate, a client stream, answers a
refusal `bad_request` in its reply), the log lines it wrote for them (Strata's
are rate-limited: one `rpc_refused` line per method and reason per 5 s, carrying
how many it folded in; counted over the warm-up and the run), and its RSS
before, after the warm-up and after; the growth is measured from after the
warm-up. Target: < 20 MB per daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from _common import print_table

MIB = 1 << 20
TARGET_GROWTH_MB = 20.0
POOL_PER_RPC = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30_000, help="corrupt messages per server, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=20260501)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------- the baseline: grpcio's thread-pool server


def serve_bare() -> int:
    """grpcio's own server with the generated servicers, logging as grpcio does (to stderr); prints its port."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from proto import strata_pb2_grpc as pb_grpc

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 4 << 20)])
    pb_grpc.add_AgentServiceServicer_to_server(pb_grpc.AgentServiceServicer(), server)
    pb_grpc.add_PeerServiceServicer_to_server(pb_grpc.PeerServiceServicer(), server)
    pb_grpc.add_CoordinatorServiceServicer_to_server(pb_grpc.CoordinatorServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    return 0


# ---------------------------------------------------------------- measuring


@dataclass
class Subject:
    """One server under garbage: where it listens, its process, and how to read its log."""

    name: str
    address: str
    pid: int
    rpcs: list
    log_path: Path
    json_log: bool

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.pid).memory_info().rss / MIB

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")


def garbage_cases(rpcs: list, count: int, rng: random.Random):  # noqa: ANN201 - a generator of Cases
    from tests.fuzz.cases import Case
    from tests.fuzz.wire import garbage_that_fails

    pools = {rpc.path: [garbage_that_fails(rpc.parse_input, rng) for _ in range(POOL_PER_RPC)] for rpc in rpcs}
    for index in range(count):
        rpc = rpcs[index % len(rpcs)]
        yield Case(rpc, "garbage", (rng.choice(pools[rpc.path]),))


def log_summary(subject: Subject, text: str) -> dict:
    """Log records written, and for Strata's JSON logs the refusal lines and what they folded in."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not subject.json_log:
        # grpcio logs through `logging`: a record starts with its level name; a traceback follows it
        records = [line for line in lines if line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")]
        return {"lines": len(lines), "records": len(records), "tracebacks": sum(1 for line in lines if line.startswith("Traceback")),
                "events": Counter(" ".join(r.split(" ")[2:6]) for r in records)}  # fmt: skip
    events = [json.loads(line) for line in lines if line.startswith("{")]
    refused = [e for e in events if e.get("event") == "rpc_refused"]
    return {
        "lines": len(lines),
        "records": len(events),
        "tracebacks": sum(1 for e in events if "exc" in e),
        "refusal_lines": len(refused),
        "refusals_logged": sum(1 + int(e.get("suppressed", 0)) for e in refused),
        "events": Counter(f"{e.get('event')} {e.get('method', '').rsplit('/', 1)[-1]} {e.get('reason', '')}".strip() for e in events),
    }


async def blast(subject: Subject, count: int, rng: random.Random, concurrency: int):  # noqa: ANN201
    from tests.fuzz.runner import run

    return await run(subject.address, garbage_cases(subject.rpcs, count, rng), concurrency=concurrency, timeout_s=30.0)


async def measure(subject: Subject, args: argparse.Namespace) -> dict:
    rng = random.Random(f"{args.seed}:{subject.name}")
    rss_start = subject.rss_mb()
    offset = subject.log_size()
    await blast(subject, args.warmup, rng, args.concurrency)
    rss_warm = subject.rss_mb()
    started = time.monotonic()
    tally = await blast(subject, args.messages, rng, args.concurrency)
    seconds = time.monotonic() - started
    await asyncio.sleep(0.5)  # let the last log lines reach the file
    rss_end = subject.rss_mb()
    return {
        "tally": tally,
        "rss": (rss_start, rss_warm, rss_end),
        "seconds": seconds,
        "log": log_summary(subject, subject.log_since(offset)),
    }


# ---------------------------------------------------------------- the run


def main() -> int:
    args = parse_args()
    if args.bare_server:
        return serve_bare()
    from proto import strata_pb2 as pb
    from tests.fuzz.fleet import ProcessFleet
    from tests.fuzz.messages import rpcs

    with tempfile.TemporaryDirectory(prefix="strata-garbage-") as tmp:
        fleet = ProcessFleet(Path(tmp))
        results: dict[str, dict] = {}
        try:
            daemons = fleet.start()
            bare = fleet.procs.spawn([], name="bare-grpcio", command=[sys.executable, str(Path(__file__).resolve()), "--bare-server"])
            port = _wait_for_port(bare)
            subjects = [
                Subject(d.name, d.address, d.process.pid, d.target.rpcs(), d.process.stderr_path, True) for d in daemons.values()
            ]
            subjects.append(Subject("bare grpcio", f"127.0.0.1:{port}", bare.pid, rpcs(pb.DESCRIPTOR), bare.stderr_path, False))

            async def measure_all() -> None:
                # one event loop for the whole run: grpc.aio does not outlive the loop it first ran on
                for subject in subjects:
                    print(f"{subject.name}: {args.warmup} + {args.messages} corrupt messages over {len(subject.rpcs)} RPCs ...", flush=True)
                    results[subject.name] = await measure(subject, args)

            asyncio.run(measure_all())
            alive = {s.name: _alive(s.pid) for s in subjects}
        finally:
            fleet.stop()
    report(args, results, alive)
    return 0


def _wait_for_port(process, timeout_s: float = 60.0) -> int:  # noqa: ANN001
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        text = process.stdout().strip()
        if text:
            return int(text.splitlines()[0])
        if not process.alive:
            raise RuntimeError(f"the bare server exited\n{process.tail()}")
        time.sleep(0.1)
    raise TimeoutError("the bare server printed no port")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def report(args: argparse.Namespace, results: dict[str, dict], alive: dict[str, bool]) -> None:
    print(f"\n{args.messages} corrupt messages per server after a warm-up of {args.warmup} (seed {args.seed})\n")
    rows = []
    bare_growth = results["bare grpcio"]["rss"][2] - results["bare grpcio"]["rss"][1]
    for name, result in results.items():
        tally, log = result["tally"], result["log"]
        histogram = tally.histogram()
        invalid = histogram["INVALID_ARGUMENT"]
        refused = histogram["OK refused:bad_request"]
        other = ", ".join(f"{s} {c}" for s, c in histogram.most_common() if s not in ("INVALID_ARGUMENT", "OK refused:bad_request"))
        start, warm, end = result["rss"]
        growth = end - warm
        ratio = f"{bare_growth / growth:.0f}x" if name != "bare grpcio" and growth > 0.5 else "-"
        rows.append([
            name, len({p for p, _ in tally.statuses}), sum(tally.calls.values()), invalid, refused, other or "-",
            log["records"], log["tracebacks"], f"{start:.0f}", f"{warm:.0f}", f"{end:.0f}", f"{growth:+.1f}",
            f"{growth * 1024 / max(1, sum(tally.calls.values())):.2f}",
            ("yes" if growth < TARGET_GROWTH_MB else "OVER") if name != "bare grpcio" else "-", ratio,
            "yes" if alive[name] else "NO", f"{sum(tally.calls.values()) / result['seconds']:.0f}",
        ])  # fmt: skip
    print_table(
        ["server", "RPCs", "messages", "INVALID_ARGUMENT", "refused in reply", "other statuses", "log records",
         "tracebacks", "RSS MiB start", "after warm-up", "after", "growth MiB", "KiB/message", "< 20 MB", "bare/this",
         "alive", "msg/s"],
        rows,
    )  # fmt: skip
    print()
    for name, result in results.items():
        log = result["log"]
        if "refusal_lines" in log:
            print(f"{name}: {log['refusal_lines']} rpc_refused lines standing for {log['refusals_logged']} refusals; events: "
                  + ", ".join(f"{e} x{c}" for e, c in log["events"].most_common(6)))  # fmt: skip
        else:
            print(f"{name}: {log['lines']} log lines, {log['records']} records; top: "
                  + ", ".join(f"{e!r} x{c}" for e, c in log["events"].most_common(3)))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
