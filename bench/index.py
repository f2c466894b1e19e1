"""The coordinator's model index at 10 million models: ingest rate and query latency.

Run alone: `python bench/index.py` (`--quick` for a smoke run on 200k rows; `--db PATH`
keeps the big index there and reuses it on the next run, since building it takes minutes).

Two indexes are built the same way in the same run: the big one (10M rows) and a small
one (10k rows), with the same shape, so that each query returns the same amount in both
and the ratio shows what the index's size costs:

  per round, each of A = 20 aggregators indexes D = 100 device updates (kind "local",
  from a pool of 1,000 agents per aggregator), a cluster model naming those 100 as
  parents, and a semi-global model naming its own cluster and 3 peers' clusters.
  10M rows are 4,902 such rounds, 10k rows 5 of them.

The rows are *synthetic but valid-shaped*: each is what `ModelIndex` would write for a
canonical manifest of the schema (4 tensors, base, metrics, timestamps), the row's CID
is the CID of those bytes, and a sample is re-parsed with `Manifest.from_bytes` and
checked against its row. Signing 10M manifests would take longer than building the
index, so their signatures are well-formed but not genuine, and the rows are
bulk-inserted (no validation; secondary indexes created after the load) instead of
going through `record_many`. Ingest is measured separately, on genuinely signed
manifests (each agent its own key), through `ModelIndex.record_many`, the call
AnnounceModels makes, in batches of 500 (the aggregator's batch), into an empty index
and into the big one; and once more end to end over gRPC (client -> real servicer ->
index, one process).

Queries go through the `ModelIndex` API, as the servicer calls it, with random targets
spread over the whole index:

  latest    list(kind=cluster|semi-global, latest_per_aggregator=True): 20 rows
  latest/1  list(kind=..., aggregator=agg-N, limit=1): one aggregator's newest
  lineage   lineage(semi-global, depth=3): 4 clusters + 400 updates
  children  children(cluster): the semi-globals that used it (about 4)

Targets: ingest >= 20,000 manifests/s; every query < 50 ms at 10M rows.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import random
import re
import sqlite3
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import _common
from _common import percentile, print_table

from coordinator.client import CoordinatorClient
from coordinator.index import ModelIndex, _unix_seconds
from coordinator.membership import Membership
from coordinator.service import CoordinatorServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.serving import create_server
from storage.cid import cid_of
from storage.codec import TensorInfo
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, canonical_json, rfc3339

TARGET_INGEST = 20_000
TARGET_QUERY_MS = 50.0
AGGREGATORS = 20
UPDATES_PER_CLUSTER = 100
AGENTS_PER_AGGREGATOR = 1_000
PEERS = 3
BATCH = 500
# the ingest round: this many signed updates per aggregator, so each cluster model names this many
UPDATES_PER_CLUSTER_INGEST = 1_000
FEDERATION = "bench"
ROWS_PER_ROUND = AGGREGATORS * (UPDATES_PER_CLUSTER + 2)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ROUND_S = 120.0
TENSORS = {f"layer{i}.{part}": TensorInfo("F32", shape) for i, (part, shape) in enumerate(
    [("weight", (256, 784)), ("bias", (256,)), ("weight", (10, 256)), ("bias", (10,))]
)}  # fmt: skip


# ---------------------------------------------------------------- synthetic rows


def _template(kind: str) -> string.Template:
    """Canonical JSON of a manifest of `kind` with $placeholders where rows differ."""
    fields = {
        "algorithm": {} if kind == "local" else {"name": "fedavg"},
        "base": "$base" if kind == "local" else None,
        "created_at": "$created_at",
        "extra": {"base_metrics": {"loss": 0.61}} if kind == "local" else {},
        "federation": FEDERATION,
        "kind": kind,
        "metrics": {"loss": 0.5},
        "num_samples": "$num_samples",
        "parents": "$parents",
        "producer": {"id": "$producer", "role": "agent" if kind == "local" else "aggregator"},
        "round": "$round",
        "schema": "strata/model/1",
        # well-formed (right alg and lengths) but not genuine: see the module docstring
        "signature": {"alg": "ed25519", "public_key": "$public_key", "sig": "$sig"},
        "tensors": {name: info.to_json() for name, info in TENSORS.items()},
        "weights": "$weights",
    }
    text = canonical_json(fields).decode()
    for number in ("num_samples", "parents", "round"):
        text = text.replace(f'"${number}"', f"${number}")
    return string.Template(text)


class SyntheticFleet:
    """Rows in the order a coordinator would index them, round after round."""

    def __init__(self, rounds: int, seed: int = 1) -> None:
        self.rounds = rounds
        rng = random.Random(seed)
        self._weights = [cid_of(rng.randbytes(16)) for _ in range(4096)]
        self._public_key = base64.b64encode(rng.randbytes(32)).decode()
        self._sig = base64.b64encode(rng.randbytes(64)).decode()
        self._templates = {kind: _template(kind) for kind in ("local", "cluster", "semi-global")}
        self.next_id = 1
        self.edges: list[tuple[str, int]] = []

    def _row(self, kind: str, *, round: int, producer: str, at: float, parents: list[str], base: str) -> tuple:
        row_id, self.next_id = self.next_id, self.next_id + 1
        created_at = rfc3339(at)
        num_samples = 100 * len(parents) if parents else 100
        weights = self._weights[row_id % len(self._weights)]
        manifest = self._templates[kind].substitute(
            base=base,
            created_at=created_at,
            num_samples=num_samples,
            parents=json.dumps(parents, separators=(",", ":")),
            producer=producer,
            round=round,
            public_key=self._public_key,
            sig=self._sig,
            weights=weights,
        ).encode()
        cid = cid_of(manifest)
        self.edges.extend((parent, row_id) for parent in parents)
        role = "agent" if kind == "local" else "aggregator"
        return (row_id, cid, kind, FEDERATION, round, producer, role, json.dumps(parents), num_samples,
                '{"loss": 0.5}', _unix_seconds(created_at), weights, "{}", at + 1.0, manifest)  # fmt: skip

    def rounds_of_rows(self) -> Iterator[list[tuple]]:
        """One list of rows per round."""
        base = {a: cid_of(f"base model {a}".encode()) for a in range(AGGREGATORS)}
        for r in range(self.rounds):
            rows, clusters = [], {}
            for a in range(AGGREGATORS):
                start = T0 + r * ROUND_S + a * 0.5
                updates = []
                for i in range(UPDATES_PER_CLUSTER):
                    agent = f"agent-{a}-{(r * UPDATES_PER_CLUSTER + i) % AGENTS_PER_AGGREGATOR}"
                    row = self._row("local", round=r, producer=agent, at=start + i * 0.01, parents=[], base=base[a])
                    rows.append(row)
                    updates.append(row[1])
                cluster = self._row("cluster", round=r, producer=f"agg-{a}", at=start + 60, parents=sorted(updates),
                                    base="")  # fmt: skip
                rows.append(cluster)
                clusters[a] = cluster[1]
            for a in range(AGGREGATORS):
                peers = [clusters[(a + k) % AGGREGATORS] for k in range(1, PEERS + 1)]
                semi = self._row("semi-global", round=r, producer=f"agg-{a}", at=T0 + r * ROUND_S + 90 + a * 0.5,
                                 parents=[clusters[a], *peers], base="")  # fmt: skip
                rows.append(semi)
                base[a] = semi[1]
            yield rows


_INSERT = (
    "INSERT INTO models (id, cid, kind, federation, round, producer, producer_role, parents, num_samples, metrics,"
    " created_at, weights, notes, indexed_at, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INDEX_NAME = re.compile(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+) ON models")


def build(path: Path, rows: int) -> dict[str, float]:
    """Bulk-load about `rows` synthetic rows into a new index file with ModelIndex's schema."""
    ModelIndex(path).close()  # the schema and its version, exactly as the coordinator creates them
    fleet = SyntheticFleet(rounds=max(1, round(rows / ROWS_PER_ROUND)))
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")
    for name in _INDEX_NAME.findall(ModelIndex.SCHEMA):
        db.execute(f"DROP INDEX {name}")
    db.execute("CREATE TEMP TABLE edges_load (parent TEXT NOT NULL, child INTEGER NOT NULL)")
    checked = 0
    db.execute("BEGIN")
    for rows_of_round in fleet.rounds_of_rows():
        db.executemany(_INSERT, rows_of_round)
        db.executemany("INSERT INTO edges_load VALUES (?, ?)", fleet.edges)
        fleet.edges.clear()
        if checked < 3:
            _check_rows(rows_of_round[:: max(1, len(rows_of_round) // 20)])
            checked += 1
    db.execute("COMMIT")
    loaded = time.perf_counter()
    db.execute("INSERT INTO edges SELECT parent, child FROM edges_load ORDER BY parent, child")
    db.execute("DROP TABLE edges_load")
    db.executescript(ModelIndex.SCHEMA)  # the secondary indexes again, built from sorted runs
    db.close()
    return {"rows": fleet.next_id - 1, "load_s": loaded - started, "index_s": time.perf_counter() - loaded}


def _check_rows(rows: list[tuple]) -> None:
    """A synthetic row must be what the index would write for its manifest."""
    for row in rows:
        manifest = Manifest.from_bytes(row[-1])
        assert manifest.canonical_bytes() == row[-1], "synthetic manifest is not canonical JSON"
        assert manifest.cid == row[1] and manifest.kind == row[2] and manifest.round == row[4]
        assert manifest.producer.id == row[5] and list(manifest.parents) == json.loads(row[7])
        assert manifest.num_samples == row[8] and manifest.weights == row[11]
        assert _unix_seconds(manifest.created_at) == row[10]


# ---------------------------------------------------------------- queries


def _one(index: ModelIndex, sql: str, args: tuple) -> str:
    return index._read(sql, args)[0][0]


def query_latency(index: ModelIndex, *, samples: int, seed: int = 2) -> dict[str, tuple[list[float], list[float]]]:
    """Milliseconds of each query kind over `samples` random targets (after a short warm-up):
    wall clock, and this thread's CPU time (what the query costs when it has a core to itself)."""
    rng = random.Random(seed)
    rounds = int(_one(index, "SELECT MAX(round) FROM models WHERE kind = 'semi-global'", ())) + 1

    def target(kind: str) -> str:
        return _one(
            index,
            "SELECT cid FROM models WHERE kind = ? AND producer = ? AND round = ?",
            (kind, f"agg-{rng.randrange(AGGREGATORS)}", rng.randrange(rounds)),
        )

    def kind() -> str:
        return rng.choice(["cluster", "semi-global"])

    calls: dict[str, Callable[[], Callable[[], object]]] = {
        "latest": lambda: functools.partial(index.list, kind=kind(), latest_per_aggregator=True),
        "latest/1": lambda: functools.partial(
            index.list, kind=kind(), aggregator=f"agg-{rng.randrange(AGGREGATORS)}", limit=1
        ),
        "lineage": lambda: functools.partial(index.lineage, target("semi-global"), depth=3),
        "children": lambda: functools.partial(index.children, target("cluster")),
    }
    expected = {"latest": AGGREGATORS, "latest/1": 1, "lineage": (PEERS + 1) * (UPDATES_PER_CLUSTER + 1)}
    timings: dict[str, tuple[list[float], list[float]]] = {}
    for name, make in calls.items():
        prepared = [make() for _ in range(samples + 10)]
        wall, cpu = [], []
        for n, call in enumerate(prepared):
            started, started_cpu = time.perf_counter(), time.thread_time()
            answer = call()
            if n >= 10:
                wall.append((time.perf_counter() - started) * 1000)
                cpu.append((time.thread_time() - started_cpu) * 1000)
        size = len(answer.ancestors) if name == "lineage" else len(answer)  # type: ignore[attr-defined]
        assert name not in expected or size == expected[name], f"{name} answered {size} rows"
        timings[name] = (wall, cpu)
    return timings


# ---------------------------------------------------------------- ingest


def signed_manifests(updates_per_aggregator: int, seed: int = 3) -> list[list[bytes]]:
    """Genuinely signed manifests of one round, in batches of BATCH as an aggregator's sender
    would take them: each aggregator's updates (each agent its own key), then its cluster
    model (naming them all), then its semi-global model."""
    rng = random.Random(seed)
    stream: list[bytes] = []
    clusters = {}
    base = cid_of(b"ingest base")
    for a in range(AGGREGATORS):
        aggregator_key = KeyPair.generate()
        updates = []
        for i in range(updates_per_aggregator):
            update = Manifest(
                kind="local",
                federation=FEDERATION,
                round=1,
                producer=Producer(role="agent", id=f"ingest-agent-{a}-{i}"),
                weights=cid_of(rng.randbytes(16)),
                tensors=TENSORS,
                base=base,
                num_samples=100,
                metrics={"loss": 0.5},
                extra={"base_metrics": {"loss": 0.61}},
                created_at=rfc3339(T0 + 10_000 + i * 0.01),
            ).signed(KeyPair.generate())
            stream.append(update.to_bytes())
            updates.append(update.cid)
        cluster = Manifest(
            kind="cluster", federation=FEDERATION, round=1, producer=Producer(role="aggregator", id=f"ingest-agg-{a}"),
            weights=cid_of(rng.randbytes(16)), tensors=TENSORS, parents=tuple(sorted(updates)),
            num_samples=100 * len(updates), algorithm={"name": "fedavg"}, created_at=rfc3339(T0 + 10_060),
        ).signed(aggregator_key)  # fmt: skip
        stream.append(cluster.to_bytes())
        clusters[a] = (cluster.cid, aggregator_key)
    for a in range(AGGREGATORS):
        parents = [clusters[(a + k) % AGGREGATORS][0] for k in range(PEERS + 1)]
        semi = Manifest(
            kind="semi-global", federation=FEDERATION, round=1,
            producer=Producer(role="aggregator", id=f"ingest-agg-{a}"), weights=cid_of(rng.randbytes(16)),
            tensors=TENSORS, parents=tuple(parents), num_samples=400, algorithm={"name": "fedavg"},
            created_at=rfc3339(T0 + 10_090),
        ).signed(clusters[a][1])  # fmt: skip
        stream.append(semi.to_bytes())
    return [stream[i : i + BATCH] for i in range(0, len(stream), BATCH)]


def forget_ingested(path: Path) -> None:
    """Take the ingest round's models (producers "ingest-*") out of the big index again, so a reused
    index answers the same next time. (Benchmark housekeeping: the index itself never deletes.)"""
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("BEGIN")
        db.execute(
            "DELETE FROM edges WHERE child IN (SELECT id FROM models WHERE producer LIKE 'ingest-%')"
        )
        db.execute("DELETE FROM models WHERE producer LIKE 'ingest-%'")
        db.execute("COMMIT")
    db.close()


def ingest_rate(index: ModelIndex, batches: list[list[bytes]]) -> tuple[float, float]:
    """Manifests per second through record_many, batch after batch: per wall second, and per
    second of this thread's CPU time."""
    started, started_cpu = time.perf_counter(), time.thread_time()
    for batch in batches:
        results = index.record_many((manifest, None) for manifest in batch)
        assert not any(r.refused for r in results), [r for r in results if r.refused][:1]
    count = sum(len(b) for b in batches)
    return count / (time.perf_counter() - started), count / (time.thread_time() - started_cpu)


def ingest_rate_grpc(path: Path, batches: list[list[bytes]], *, batched: bool = True) -> tuple[float, float]:
    """Manifests per second through CoordinatorClient.announce_many -> AnnounceModels -> record_many
    (or, with batched=False, one AnnounceModel call per manifest, as before batching): per wall
    second, and per second of the whole process's CPU time (client and server)."""
    membership, index = Membership(), ModelIndex(path)
    handle = create_server("127.0.0.1:0")
    pb_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(membership, index, offload=handle.offload), handle.server
    )
    try:
        with handle, CoordinatorClient(handle.address, timeout_s=60.0) as client:
            started, started_cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                if batched:
                    assert not any(r.refused for r in client.announce_many((manifest, None) for manifest in batch))
                else:
                    for manifest in batch:
                        client.announce(manifest)
            count = sum(len(b) for b in batches)
            return count / (time.perf_counter() - started), count / (time.process_time() - started_cpu)
    finally:
        membership.close()
        index.close()


def validation_costs(batches: list[list[bytes]]) -> dict[str, float]:
    """CPU microseconds per device update (this thread's time, so other load on the machine
    does not inflate it): parsing with every schema check, then the signature check
    (re-serializing the signed fields, decoding, ed25519 verify); and milliseconds for a
    cluster model, which names every update of its round."""
    updates = [m for batch in batches for m in batch if b'"kind":"local"' in m][:5000]
    clusters = [m for batch in batches for m in batch if b'"kind":"cluster"' in m][:5]
    started = time.thread_time()
    parsed = [Manifest.from_bytes(m) for m in updates]
    parse = time.thread_time() - started
    started = time.thread_time()
    for manifest in parsed:
        manifest.verify_signature()
    verify = time.thread_time() - started
    started = time.thread_time()
    for manifest in clusters:
        Manifest.from_bytes(manifest).verify_signature()
    cluster = time.thread_time() - started
    return {
        "parse_us": parse / len(updates) * 1e6,
        "signature_us": verify / len(updates) * 1e6,
        "cluster_ms": cluster / len(clusters) * 1000,
    }


def write_rate(path: Path, batches: list[list[bytes]]) -> tuple[float, float]:
    """The index's write path alone: every manifest validated first (untimed), then only the
    per-batch transactions record_many runs (the same statements) are timed."""
    with ModelIndex(path) as index:
        validated = [[index._validate(manifest, None, cid_of(manifest)) for manifest in batch] for batch in batches]
        started, started_cpu = time.perf_counter(), time.thread_time()
        for batch in validated:
            index._write(index._statements(batch))
        count = sum(len(b) for b in batches)
        return count / (time.perf_counter() - started), count / (time.thread_time() - started_cpu)


# ---------------------------------------------------------------- main


def summarize(timings: dict[str, tuple[list[float], list[float]]]) -> dict[str, tuple[float, float, float]]:
    """(p50 wall, p99 wall, p50 CPU) per query kind."""
    return {
        name: (percentile(wall, 0.5), percentile(wall, 0.99), percentile(cpu, 0.5))
        for name, (wall, cpu) in timings.items()
    }


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the big index (default 10M)")
    parser.add_argument("--small", type=int, default=10_000, help="rows of the small index (default 10k)")
    parser.add_argument("--samples", type=int, default=300, help="timed queries of each kind")
    parser.add_argument("--db", type=Path, default=None, help="keep the big index here and reuse it")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200k rows, 50 samples")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.samples = 200_000, 50
    _common.quiet_logs()

    with tempfile.TemporaryDirectory(prefix="strata-bench-index-") as tmp:
        root = Path(tmp)
        big_path = args.db or root / "big.db"
        if big_path.exists():
            forget_ingested(big_path)  # in case an earlier run stopped before it could
            with ModelIndex(big_path) as existing:
                have = existing.count()
            if have < args.rows * 0.99:
                raise SystemExit(f"{big_path} holds {have} rows, fewer than {args.rows}: remove it to rebuild")
            print(f"reusing {big_path}: {have:,} rows")
        else:
            built = build(big_path, args.rows)
            print(
                f"built {big_path}: {built['rows']:,} rows in {built['load_s']:.0f} s load"
                f" + {built['index_s']:.0f} s indexes, {big_path.stat().st_size / 1e9:.1f} GB"
            )
        small_path = root / "small.db"
        built = build(small_path, args.small)
        print(f"built the small index: {built['rows']:,} rows")

        print(f"queries: {load()}")
        with ModelIndex(small_path) as small:
            small_q = summarize(query_latency(small, samples=args.samples))
        with ModelIndex(big_path) as big:
            big_rows = big.count()
            big_q = summarize(query_latency(big, samples=args.samples))

        print(f"\nquery latency, ms ({args.samples} random targets each; target < {TARGET_QUERY_MS:g} ms at 10M)")
        rows = []
        for name in big_q:
            (b50, b99, bcpu), (s50, s99, scpu) = big_q[name], small_q[name]
            met = "ok" if b99 < TARGET_QUERY_MS else "OVER"
            rows.append([name, f"{b50:.2f}", f"{b99:.2f}", f"{bcpu:.2f}", f"{s50:.2f}", f"{s99:.2f}", f"{scpu:.2f}",
                         f"{b50 / s50:.2f}", f"{b99 / s99:.2f}", f"{bcpu / scpu:.2f}", met])  # fmt: skip
        big_name, small_name = f"{big_rows / 1e6:.1f}M", f"{args.small // 1000}k"
        print_table(
            ["query", f"{big_name} p50", "p99", "cpu p50", f"{small_name} p50", "p99", "cpu p50",
             "ratio p50", "p99", "cpu", "p99 < 50"], rows  # fmt: skip
        )
        print(f"after the queries: {load()}")

        batches = signed_manifests(UPDATES_PER_CLUSTER_INGEST)
        count = sum(len(b) for b in batches)
        print(f"\ningest: {count:,} signed manifests in batches of {BATCH} (target >= {TARGET_INGEST:,}/s); {load()}")
        costs = validation_costs(batches)
        with ModelIndex(root / "fresh.db") as fresh:
            empty_rate = ingest_rate(fresh, batches)
        grpc_rate = ingest_rate_grpc(root / "grpc.db", batches)
        single_rate = ingest_rate_grpc(root / "single.db", batches[:4], batched=False)
        with ModelIndex(big_path) as big:
            big_rate = ingest_rate(big, batches)
        forget_ingested(big_path)
        written = write_rate(root / "write.db", batches)
        print_table(
            ["path", "manifests/s", "per CPU-second", "target"],
            [
                ["record_many, empty index", *_rates(empty_rate)],
                [f"record_many, into the {big_name} index", *_rates(big_rate)],
                ["announce_many over gRPC, empty index", *_rates(grpc_rate)],
                [f"announce, one call each, over gRPC ({4 * BATCH:,})", *_rates(single_rate)],
                ["write path only (validated before), empty index", *_rates(written)],
            ],
        )
        per_update = costs["parse_us"] + costs["signature_us"]
        print(
            f"\nCPU per device update: parse + schema {costs['parse_us']:.0f} us, signature {costs['signature_us']:.0f} us"
            f" ({costs['signature_us'] / per_update:.0%} of validation); validation alone caps one core at"
            f" {1e6 / per_update:,.0f}/s"
        )
        print(f"a cluster model naming {UPDATES_PER_CLUSTER_INGEST:,} updates: {costs['cluster_ms']:.1f} ms to validate")
        print(f"done: {load()}")
        if args.db is None:
            print(f"(the big index was {big_path.stat().st_size / 1e9:.1f} GB; pass --db to keep it)")


def _rates(rates: tuple[float, float]) -> list[str]:
    wall, cpu = rates
    return [f"{wall:,.0f}", f"{cpu:,.0f}", "ok" if wall >= TARGET_INGEST else "MISSES"]


if __name__ == "__main__":
    main()
