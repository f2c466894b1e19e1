"""Ingest: one aggregator receiving updates over loopback gRPC, against a raw stream of the same bytes.

Run alone: `python bench/ingest.py` (`--quick` for a smoke run).

  strata: an in-process AggregatorDaemon on 127.0.0.1:0 (temporary state and store,
          a round that cannot close during the measurement) takes SubmitUpdate streams
          of valid updates (the base plus small noise, signed manifests, one distinct
          agent per update): reassembly, hashing, validation, store, journal and the
          FedAvg fold are all in the timed path, up to the acknowledgement.
  raw:    the same UpdateChunk streams (proto.wire.stream_with_header) to a trivial
          AgentService whose SubmitUpdate only reassembles them (read_header_stream).

Updates are sent one after another from one client, in the same process as the
server (both sides share the GIL in both cases). MB/s is update bytes per second
(10**6 B/s), best of N batches. Target: strata >= 60% of raw.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import (
    print_table,
    quiet_logs,
    random_model,
    raw_agent_server,
    save_base_model,
    signed_update,
)

from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import STREAM_TIMEOUT_S, create_channel, stream_with_header
from storage.store import LocalStore

TARGET_RATIO = 0.6
MAX_BYTES = 1 << 30


def send_all(stub: pb_grpc.AgentServiceStub, updates: list[tuple[pb.UpdateHeader, bytes]]) -> float:
    """Submit each update in turn; seconds from the first byte to the last acknowledgement."""
    started = time.perf_counter()
    for header, blob in updates:
        reply = stub.SubmitUpdate(stream_with_header(pb.UpdateChunk, header, blob), timeout=STREAM_TIMEOUT_S)
        if not reply.accepted:
            raise SystemExit(f"update from {header.agent_id} refused: {reply.reason}: {reply.message}")
    return time.perf_counter() - started


def measure(params: int, per_batch: int, batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="strata-bench-ingest-") as tmp:
        root = Path(tmp)
        os.environ["HOME"] = str(root / "home")
        store_dir = root / "store"
        base = random_model(params, seed=1)
        with LocalStore(store_dir) as store:
            base_cid = save_base_model(store, base)
        updates = [
            [
                signed_update(
                    base_cid=base_cid,
                    round_=0,
                    agent_id=f"agent-{batch}-{index}",
                    tensors=_common.perturbed(base, seed=batch * 1000 + index),
                )
                for index in range(per_batch)
            ]
            for batch in range(batches)
        ]
        batch_bytes = sum(len(blob) for _, blob in updates[0])

        config = AggregatorConfig(
            id="agg-bench",
            listen="127.0.0.1:0",
            federation=_common.FEDERATION,
            initial_model=base_cid,
            state_dir=str(root / "state"),
            store=f"local:{store_dir}",
            round=RoundSettings(
                min_updates=1_000_000, quorum=1.0, deadline_s=3600.0, max_update_bytes=MAX_BYTES
            ),
        )
        with raw_agent_server(max_bytes=MAX_BYTES) as raw_server, AggregatorDaemon(config) as daemon:
            raw_channel = create_channel(raw_server.address)
            strata_channel = create_channel(daemon.address)
            raw_stub, strata_stub = pb_grpc.AgentServiceStub(raw_channel), pb_grpc.AgentServiceStub(strata_channel)
            send_all(raw_stub, updates[0][:1])  # warm both connections up
            raw_best = strata_best = float("inf")
            for batch in updates:
                # interleaved, so a noisy stretch of the machine hits both sides alike
                raw_best = min(raw_best, send_all(raw_stub, batch))
                strata_best = min(strata_best, send_all(strata_stub, batch))
            accepted = daemon.rounds.accepted_count
            raw_channel.close()
            strata_channel.close()
        if accepted != per_batch * batches:
            raise SystemExit(f"the aggregator accepted {accepted} updates, expected {per_batch * batches}")
    return {
        "update_mb": batch_bytes / per_batch / _common.MB,
        "raw_mbps": batch_bytes / raw_best / _common.MB,
        "strata_mbps": batch_bytes / strata_best / _common.MB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 1M model only, fewer updates")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads in this process (0: torch's default)"
    )
    args = parser.parse_args()
    quiet_logs()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    # (params, updates per batch, batches); best batch kept
    plan = [(1_000_000, 4, 2)] if args.quick else [(1_000_000, 16, 4), (10_000_000, 4, 4)]
    rows, worst = [], float("inf")
    for params, per_batch, batches in plan:
        result = measure(params, per_batch, batches)
        ratio = result["strata_mbps"] / result["raw_mbps"]
        worst = min(worst, ratio)
        rows.append(
            [
                f"{params / 1e6:g}M",
                f"{result['update_mb']:.1f}",
                f"{per_batch} x {batches}",
                f"{result['raw_mbps']:.0f}",
                f"{result['strata_mbps']:.0f}",
                f"{ratio:.2f}",
            ]
        )
    print_table(["params", "update MB", "updates x batches", "raw MB/s", "strata MB/s", "ratio"], rows)
    verdict = "meets" if worst >= TARGET_RATIO else "MISSES"
    print(f"worst ratio {worst:.2f} {verdict} the target of {TARGET_RATIO} (strata / raw, best batch each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
