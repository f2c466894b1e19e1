"""Helpers shared by the benchmarks: repo on sys.path, best-of-N timing, peak RSS, tables.

Each benchmark is a plain script (`python bench/x.py`), so this module is imported as
`_common` from the script's own directory and puts the repository root on sys.path.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MB = 1e6  # throughput is reported in MB/s and GB/s of 10**6 / 10**9 bytes
MIB = 1 << 20


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls: the machine is shared and noisy, so the
    minimum is the least disturbed measurement."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux's VmHWM first: ru_maxrss survives execve, so a worker started by a parent
    that had grown would report the parent's peak instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def run_worker(script: Path, args: Sequence[str], *, timeout_s: float = 600.0) -> dict:
    """Run `python script --worker args...` in a fresh interpreter and parse the JSON it
    prints last: a fresh process is the only way to get a peak RSS that earlier
    configurations did not raise."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    completed = subprocess.run(
        [sys.executable, str(script), "--worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=REPO,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {script.name} {list(args)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A right-aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def quiet_logs() -> None:
    """Daemons log one line per event; a benchmark wants its table, and only the warnings, with
    their fields (an agent's `update_refused` is worth nothing without its reason)."""
    from strata.logs import setup_logging

    setup_logging("warning", fmt="text")


# ---------------------------------------------------------------- models for the loop benchmarks

# a model is several tensors of mixed sizes, like a real network's layers
TENSOR_FRACTIONS = (0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005)
FEDERATION = "bench"


def model_layout(params: int) -> dict[str, int]:
    """Tensor name -> element count, summing to exactly `params`."""
    sizes = [int(params * f) for f in TENSOR_FRACTIONS]
    sizes[0] += params - sum(sizes)
    return {f"layer{i}.weight": size for i, size in enumerate(sizes)}


def random_model(params: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(size, dtype=np.float32) for name, size in model_layout(params).items()}


def save_base_model(store: object, tensors: dict) -> str:
    """Store `tensors` as a signed round-0 base model of FEDERATION; returns its model CID."""
    from storage.codec import encode_tensors
    from storage.keys import KeyPair
    from storage.manifest import Producer
    from storage.models import save_model

    manifest = save_model(
        store,  # type: ignore[arg-type]
        weights=encode_tensors(tensors),
        kind="base",
        federation=FEDERATION,
        round=0,
        producer=Producer(role="operator", id="bench"),
        key=KeyPair.generate(),
    )
    return manifest.cid


def perturbed(base: dict, seed: int, scale: float = 1e-3) -> dict:
    """The base plus small noise: a valid update (finite, well inside the norm bound)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        name: array + rng.standard_normal(array.shape, dtype=np.float32) * np.float32(scale)
        for name, array in base.items()
    }


def signed_update(*, base_cid: str, round_: int, agent_id: str, tensors: dict, num_samples: int = 100):
    """(UpdateHeader, blob) exactly as agent.client.Client sends them: a signed local manifest."""
    from proto import strata_pb2 as pb
    from storage.cid import cid_of
    from storage.codec import encode_tensors, summarize
    from storage.keys import KeyPair
    from storage.manifest import Manifest, Producer, now_rfc3339

    blob = encode_tensors(tensors)
    weights_cid = cid_of(blob)
    manifest = Manifest(
        kind="local",
        federation=FEDERATION,
        round=round_,
        producer=Producer(role="agent", id=agent_id),
        weights=weights_cid,
        tensors=summarize(blob),
        base=base_cid,
        num_samples=num_samples,
        metrics={"loss": 0.5},
        extra={"base_metrics": {}},
        created_at=now_rfc3339(),
    ).signed(KeyPair.generate())
    header = pb.UpdateHeader(
        agent_id=agent_id,
        round=round_,
        base_cid=base_cid,
        num_samples=num_samples,
        metrics={"loss": 0.5},
        weights_size=len(blob),
        weights_cid=weights_cid,
        federation=FEDERATION,
        kind="local",
        manifest=manifest.to_bytes(),
    )
    return header, blob


# ---------------------------------------------------------------- the raw gRPC floor


def raw_agent_server(model_blob: bytes = b"", *, max_bytes: int = 1 << 30):
    """A started AgentService on 127.0.0.1:0 that does only the wire work: GetModel streams
    `model_blob` in chunks, SubmitUpdate reassembles the stream and says accepted.

    Same messages, chunking, server factory and stream reader as the real services
    (proto.serving), so the difference from a real aggregator is everything Strata does
    beyond moving bytes.
    """
    from proto import strata_pb2 as pb
    from proto import strata_pb2_grpc as pb_grpc
    from proto.serving import create_server, receive_header_stream
    from proto.wire import stream_with_header

    server = create_server("127.0.0.1:0")

    class RawAgentService(pb_grpc.AgentServiceServicer):
        async def GetModel(self, request, context):  # noqa: N802 - gRPC method name
            header = pb.ModelHeader(model_cid="raw", weights_size=len(model_blob))
            for message in stream_with_header(pb.ModelChunk, header, model_blob):
                yield message

        async def SubmitUpdate(self, request_iterator, context):  # noqa: N802 - gRPC method name
            header, _ = await receive_header_stream(
                request_iterator, size_of=lambda h: h.weights_size, max_size=max_bytes, idle_timeout_s=60,
                offload=server.offload,
            )
            return pb.SubmitUpdateReply(accepted=True, round=header.round)

    pb_grpc.add_AgentServiceServicer_to_server(RawAgentService(), server.server)
    return server.start()
