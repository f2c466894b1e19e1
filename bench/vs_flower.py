"""Strata vs Flower, side by side in one run: every device its own OS process on both sides.

Run alone: `python bench/vs_flower.py` (`--quick` for a smoke run of a few minutes).

The workload is the same on both sides: a model of P float32 parameters (1M: the 8
tensors of bench/_common.model_layout, the same seeded values), N devices that each add
N(0, 1e-3) noise to the weights they receive and send them back as 100 samples, FedAvg,
every device in every round, for N = 8 and N = 64. Each system first runs one warm-up
round (devices starting, connecting, Flower's FAB download), then R measured rounds.

- Strata: `strata aggregator serve` (round.quorum 1.0, round.min_updates N) and N
  `strata agent run` processes with task=vs_flower_trainer:NoiseTrainer. No coordinator:
  the coordinator-less fleet. Round times are the aggregator's journal (opened_at ->
  closed_at of rounds 1..R; `strata history --json` checks every round had N participants).
- Flower (flwr 1.x, deployment engine): `flower-superlink` and N `flower-supernode`
  processes, each SuperNode starting its SuperExec and one `flwr-clientapp` process per
  message, and `flwr run` of bench/flower_app (its ServerApp runs in a process the
  SuperLink starts). Round times are the ServerApp's own records: configure_train ->
  aggregate_train done (see bench/flower_app/vsflower/server_app.py).

Each system runs in its own worker process, inside a fresh network namespace when it can
(root and `unshare`), so the loopback counter there counts that system's bytes only.

Per system it reports: median and p90 round time; peak RSS summed over every process of
the fleet (server side and devices, Flower's short-lived ClientApp processes included),
sampled 4 times a second; bytes per round counted from the protocol (model bytes down and
update bytes up, as each system serializes them) and measured on the loopback interface
(everything on the wire: TCP/IP headers, HTTP or gRPC framing, polls, heartbeats); and
the CPU seconds of all processes over the whole run (sampled, approximate).

Flower is installed into its own venv, bench/.venv-flower, on first run (flwr pins
protobuf < 7, Strata needs >= 7.35): `pip install` of the `bench-flower` extra's
requirement in pyproject.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - puts the repository on sys.path
from _common import FEDERATION, REPO, median, model_layout, percentile, print_table
from _fleet import Fleet, Sampler, free_port, wait_for_port

BENCH = REPO / "bench"
FLOWER_VENV = BENCH / ".venv-flower"
FLOWER_APP = BENCH / "flower_app"
FLOWER_BIN = FLOWER_VENV / "bin"

PARAMS = 1_000_000
DEVICES = (8, 64)
# measured rounds per N, after one warm-up round. N = 64 gets 2: a Flower round there
# takes minutes on this 2-core machine, and the whole comparison has to fit in one run.
ROUNDS = {8: 5, 64: 2}
DEFAULT_ROUNDS = 5

# Flower's knobs for its fastest reasonable setting (see bench/README.md for each one):
# the ServerApp polls the SuperLink for replies every 0.1 s instead of Flower's fixed 3 s.
# Each SuperExec keeps asking its SuperNode for a ClientApp task every 1 s (the default):
# at 0.1 s, 8 SuperExecs burned about 50 CPU-seconds per round on this 2-core machine and
# the rounds got slower, not faster.
TUNED_PULL_S = 0.1
TUNED_SUPEREXEC_POLL_S = 1.0
STOCK_PULL_S = 3.0  # Flower's own Grid.send_and_receive
STOCK_SUPEREXEC_POLL_S = 1.0  # Flower's default FLWR_SUPEREXEC_TASK_POLL_INTERVAL

# What-if, not Flower as shipped: the SuperNode's fixed waits (3 s after an empty pull,
# 0.5 s while its ClientApp works) capped at this, by a sitecustomize patch.
WHATIF_SUPERNODE_SLEEP_S = 0.1

# SuperNodes started but not yet active, at most (8 registered at once without trouble)
STARTING_SUPERNODES = 8

SYSTEMS = {
    "strata": "Strata",
    "flower": "Flower (tuned)",
    "flower-stock": "Flower (stock)",
    "flower-patched": "Flower (patched SuperNode)",
}

_SUPERNODE_PATCH = """\
# bench/vs_flower.py's what-if: cap the fixed sleeps of the SuperNode's main loop
# (flwr.supernode.start_client_internal: 3 s after an empty pull, 0.5 s polls for the
# ClientApp's reply). Only in the flower-supernode process; a no-op everywhere else.
import os
import sys

if os.path.basename(sys.argv[0]) == "flower-supernode":
    import time as _time

    import flwr.supernode.start_client_internal as _loop

    _cap = float(os.environ["VS_FLOWER_SUPERNODE_SLEEP_CAP"])

    class _CappedTime:
        def __getattr__(self, name):
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds):
            _time.sleep(min(seconds, _cap))

    _loop.time = _CappedTime()
"""


# ---------------------------------------------------------------- Flower's venv


def flower_requirement() -> str:
    """The `bench-flower` extra's requirement, from pyproject.toml (one place)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (requirement,) = project["optional-dependencies"]["bench-flower"]
    return requirement


def flower_version() -> str | None:
    python = FLOWER_BIN / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('flwr'))"],
        capture_output=True, text=True, timeout=60,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_flower() -> str:
    """Create bench/.venv-flower with flwr on first run; returns the installed flwr version."""
    found = flower_version()
    if found:
        return found
    requirement = flower_requirement()
    print(f"installing {requirement} into {FLOWER_VENV.relative_to(REPO)} (first run only) ...", flush=True)
    if not (FLOWER_BIN / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(FLOWER_BIN / "python"), "-m", "pip", "install", "--quiet", requirement, "numpy"], check=True, timeout=1800
    )
    found = flower_version()
    if not found:
        raise SystemExit(f"flwr is not importable in {FLOWER_VENV} after installing {requirement}")
    return found


# ---------------------------------------------------------------- one system, in a worker process


def _strata_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=str(root / "home"), PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH)]), PYTHONHASHSEED="0")
    return env


def run_strata(n: int, rounds: int, params: int, root: Path) -> dict[str, Any]:
    from _common import random_model, save_base_model

    from aggregator.journal import Journal
    from storage.manifest import Manifest
    from storage.store import LocalStore
    from strata.cmd_history import read_history

    store_dir, state_dir = root / "store", root / "aggregator"
    with LocalStore(store_dir) as store:
        base_cid = save_base_model(store, random_model(params, seed=3))
    port = free_port()
    env = _strata_env(root)
    strata = [sys.executable, "-m", "strata"]
    settings = {
        "id": "agg-bench",
        "listen": f"127.0.0.1:{port}",
        "federation": FEDERATION,
        "initial_model": base_cid,
        "state_dir": str(state_dir),
        "store": f"local:{store_dir}",
        "round.quorum": "1.0",
        "round.min_updates": str(n),
        "round.deadline_s": "600",
    }
    aggregator_cmd = [*strata, "aggregator", "serve", "--log-level", "warning"]
    for key, value in settings.items():
        aggregator_cmd += ["--set", f"{key}={value}"]

    with Fleet(root / "logs") as fleet:
        aggregator = fleet.start("aggregator", aggregator_cmd, env, cwd=REPO)
        sampler = Sampler(server_pid=aggregator.pid).start()
        try:
            wait_for_port(port, 120, alive=aggregator)
            for i in range(n):
                agent_cmd = [*strata, "agent", "run", "--log-level", "warning"]
                for key, value in {
                    "id": f"agent-{i}",
                    "seeds": f"127.0.0.1:{port}",
                    "federation": FEDERATION,
                    "task": "vs_flower_trainer:NoiseTrainer",
                    "task_options": f"{{seed: {i}}}",
                    "state_dir": str(root / "agents" / f"agent-{i}"),
                }.items():
                    agent_cmd += ["--set", f"{key}={value}"]
                fleet.start(f"agent-{i}", agent_cmd, env, cwd=REPO)
            # round 0 is the warm-up (agents starting and joining); rounds 1..R are measured
            give_up = time.monotonic() + 120 + 60 * (rounds + 1) + 2 * n
            while True:
                closed = [row for row in _read_rows(read_history, state_dir) if row["closed"]]
                if len(closed) >= rounds + 1:
                    break
                if sampler.tripped:
                    raise FleetAborted(sampler, len(closed), sampler.tripped)
                if aggregator.poll() is not None:
                    raise RuntimeError(f"aggregator exited:\n{fleet.log_tail('aggregator')}")
                if time.monotonic() > give_up:
                    raise RuntimeError(f"only {len(closed)} rounds closed:\n{fleet.log_tail('aggregator')}")
                time.sleep(0.25)
        finally:
            fleet.stop()
            sampler.stop()

    # the operator's view: `strata history --json` (participants per round) ...
    shown = subprocess.run(
        [*strata, "history", "--json", "--state-dir", str(state_dir)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=True,
    )
    participants = {row["round"]: row["participants"] for row in json.loads(shown.stdout)[state_dir.name]}
    # ... and the journal's timestamps, which that view does not print
    with Journal(state_dir / "journal.sqlite", readonly=True) as journal:
        history = {record.round: record for record in journal.history()}
    with sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True) as db:
        updates = db.execute("SELECT counted_round, update_cid FROM updates").fetchall()

    records = []
    with LocalStore(store_dir) as store:
        for round_ in range(0, rounds + 1):
            record = history[round_]
            base = store.get(record.base_cid)
            base_bytes = len(base) + len(store.get(Manifest.from_bytes(base).weights))
            up = 0
            for counted, update_cid in updates:
                if counted == round_:
                    manifest = store.get(update_cid)
                    up += len(manifest) + len(store.get(Manifest.from_bytes(manifest).weights))
            records.append(
                {
                    "round": round_,
                    "opened_at": record.opened_at,
                    "closed_at": record.closed_at,
                    "participants": participants[round_],
                    "down_bytes": participants[round_] * base_bytes,
                    "up_bytes": up,
                }
            )
    return {"records": records, "sampler": sampler, "config": settings}


def _read_rows(read_history: Any, state_dir: Path) -> list[dict[str, Any]]:
    try:
        return read_history(state_dir)
    except Exception:  # noqa: BLE001 - the journal may not exist yet, or be mid-write
        return []


def _flower_env(root: Path, superlink_port: int, superexec_poll_s: float) -> dict[str, str]:
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=os.pathsep.join([str(FLOWER_BIN), env.get("PATH", "")]),  # the SuperLink/SuperNode start flower-superexec by name
        HOME=str(root / "home"),
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",  # no telemetry events (there is no internet here anyway)
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(superexec_poll_s),
        PYTHONHASHSEED="0",
    )
    return env


def _wait_for_activations(fleet: Fleet, count: int, superlink: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Wait until the SuperLink has logged `count` activated SuperNodes."""
    give_up = time.monotonic() + timeout_s
    while count > 0 and fleet.log_text("superlink").count("[Fleet.ActivateNode] Activated") < count:
        if superlink.poll() is not None or time.monotonic() > give_up:
            raise RuntimeError(f"SuperNode {count - 1} did not activate:\n{fleet.log_tail(f'supernode-{count - 1}')}")
        time.sleep(0.2)


def run_flower(n: int, rounds: int, params: int, root: Path, *, tuned: bool, patched: bool = False) -> dict[str, Any]:
    pull_s = TUNED_PULL_S if tuned else STOCK_PULL_S
    superexec_poll_s = TUNED_SUPEREXEC_POLL_S if tuned else STOCK_SUPEREXEC_POLL_S
    port = free_port()
    env = _flower_env(root, port, superexec_poll_s)
    supernode_env = env
    if patched:
        (root / "patch").mkdir()
        (root / "patch" / "sitecustomize.py").write_text(_SUPERNODE_PATCH)
        supernode_env = dict(env, PYTHONPATH=str(root / "patch"), VS_FLOWER_SUPERNODE_SLEEP_CAP=str(WHATIF_SUPERNODE_SLEEP_S))
    results = root / "flower-rounds.json"
    layout = ",".join(f"{name}:{count}" for name, count in model_layout(params).items())
    run_config = (
        f'num-rounds={rounds + 1} nodes={n} layout="{layout}" results="{results}" pull-interval={pull_s}'
    )
    config = {
        "superlink": f"flower-superlink --insecure --port {port} --disable-runtime-dependency-installation",
        "supernode": "flower-supernode --insecure --superlink 127.0.0.1:PORT --port RUNTIME_PORT --node-config partition-id=I",
        "isolation": "subprocess (the default): each SuperNode's SuperExec starts one flwr-clientapp process per message",
        "state": "in memory (no --database)",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": superexec_poll_s,
        "serverapp_pull_interval_s": pull_s,
        "strategy": f"FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes={n}, min_available_nodes={n})",
        "supernode_sleeps_capped_s": WHATIF_SUPERNODE_SLEEP_S if patched else None,
    }
    with Fleet(root / "logs") as fleet:
        superlink = fleet.start(
            "superlink",
            [FLOWER_BIN / "flower-superlink", "--insecure", "--port", str(port), "--disable-runtime-dependency-installation"],
            env,
            cwd=root,
        )
        sampler = Sampler(server_pid=superlink.pid).start()
        try:
            wait_for_port(port, 120, alive=superlink)
            for i in range(n):
                # at most STARTING_SUPERNODES registering at a time: 64 at once on a loaded
                # machine timed out, retried into "key already registered" (HTTP 412) and
                # exited after 3 tries (exit code 305); one at a time took 15 s each
                _wait_for_activations(fleet, i - STARTING_SUPERNODES + 1, superlink)
                fleet.start(
                    f"supernode-{i}",
                    [
                        FLOWER_BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--port", str(free_port()), "--node-config", f"partition-id={i}",
                    ],
                    supernode_env,
                    cwd=root,
                )
            submitted = subprocess.run(
                [FLOWER_BIN / "flwr", "run", str(FLOWER_APP), "bench", "--run-config", run_config, "--format", "json"],
                capture_output=True, text=True, env=env, cwd=root, timeout=300,
            )
            if submitted.returncode != 0 or not json.loads(submitted.stdout or "{}").get("success"):
                raise RuntimeError(f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}")
            # round 1 is the warm-up (the SuperNodes fetch the run and its FAB); 2..R+1 are measured
            give_up = time.monotonic() + 300 + 900 * (rounds + 1)
            done: dict[str, Any] = {}
            while len(done.get("rounds", [])) < rounds + 1:
                if sampler.tripped:
                    raise FleetAborted(sampler, len(done.get("rounds", [])), sampler.tripped)
                if superlink.poll() is not None:
                    raise RuntimeError(f"SuperLink exited:\n{fleet.log_tail('superlink')}")
                if time.monotonic() > give_up:
                    raise RuntimeError(
                        f"only {len(done.get('rounds', []))} rounds done:\n{fleet.log_tail('superlink')}"
                    )
                time.sleep(0.25)
                if results.exists():
                    done = json.loads(results.read_text())
        finally:
            fleet.stop()
            sampler.stop()
    config["flwr"] = done["flwr"]
    return {"records": done["rounds"], "sampler": sampler, "config": config}


class FleetAborted(RuntimeError):
    """The run was called off (the memory guard); what was measured until then is kept."""

    def __init__(self, sampler: Sampler, rounds_done: int, reason: str) -> None:
        super().__init__(reason)
        self.sampler, self.rounds_done = sampler, rounds_done


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")  # so the fleet's finally: blocks stop every process


def worker(system: str, n: int, rounds: int, params: int, out: Path) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.environ.get("VS_FLOWER_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix=f"vs-flower-{system}-{n}-") as tmp:
        root = Path(tmp)
        try:
            if system == "strata":
                ran = run_strata(n, rounds, params, root)
            else:
                ran = run_flower(
                    n, rounds, params, root, tuned=system != "flower-stock", patched=system == "flower-patched"
                )
        except FleetAborted as aborted:
            rss_all, rss_server = aborted.sampler.peak_rss_mib()
            out.write_text(json.dumps({
                "system": system, "n": n, "params": params, "aborted": str(aborted),
                "rounds_done": aborted.rounds_done, "peak_rss_mib": rss_all, "peak_rss_server_mib": rss_server,
                "max_processes": aborted.sampler.max_processes(),
            }))
            return
    records, sampler = ran["records"], ran["sampler"]
    measured = records[1:]  # the first round is the warm-up
    short = [r["round"] for r in measured if r["participants"] != n]
    if short:
        raise SystemExit(f"{system}: rounds {short} closed without all {n} devices")
    seconds = [r["closed_at"] - r["opened_at"] for r in measured]
    start = sampler.loopback_at(measured[0]["opened_at"])
    end = sampler.loopback_at(measured[-1]["closed_at"])
    cpu_start = sampler.cpu_at(measured[0]["opened_at"])
    cpu_end = sampler.cpu_at(measured[-1]["closed_at"])
    clientapps = sampler.lifetimes_of("flwr-clientapp")
    rss_all, rss_server = sampler.peak_rss_mib()
    result = {
        "system": system,
        "n": n,
        "rounds": len(measured),
        "params": params,
        "warmup_s": records[0]["closed_at"] - records[0]["opened_at"],
        "round_s": seconds,
        "median_s": median(seconds),
        "p90_s": percentile(seconds, 0.9),
        "peak_rss_mib": rss_all,
        "peak_rss_server_mib": rss_server,
        "max_processes": sampler.max_processes(),
        "cpu_s": sampler.cpu_seconds(),
        "cpu_s_per_round": None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) / len(measured),
        "clientapp_processes": len(clientapps),
        "clientapp_lifetime_median_s": median(clientapps) if clientapps else None,
        "payload_down_per_round": median([r["down_bytes"] for r in measured]),
        "payload_up_per_round": median([r["up_bytes"] for r in measured]),
        # from the first measured round's opening to the last one's close, per round
        "loopback_per_round": None
        if start is None or end is None or os.environ.get("VS_FLOWER_NETNS") != "1"
        else (end - start) / len(measured),
        "config": ran["config"],
    }
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------- the driver


def netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    return probe.returncode == 0


def run_one(system: str, n: int, rounds: int, params: int, netns: bool, out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{system}-{n}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--n", str(n),
           "--rounds", str(rounds), "--params", str(params), "--out", str(out)]
    env = dict(os.environ, VS_FLOWER_NETNS="1" if netns else "0")
    if netns:
        cmd = ["unshare", "-n", *cmd]
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    print(f"  {SYSTEMS[system]}, N = {n} ...", end=" ", flush=True)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1200 + 900 * (rounds + 1))
    if done.returncode != 0:
        print("FAILED")
        reason = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}", file=sys.stderr)
        return {"system": system, "n": n, "params": params, "aborted": f"failed: {reason}", "rounds_done": 0,
                "peak_rss_mib": 0.0, "peak_rss_server_mib": 0.0, "max_processes": 0,
                "load_before": load_before, "load_after": os.getloadavg()[0]}
    result = json.loads(out.read_text())
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    if "aborted" in result:
        print(f"ABORTED after {result['rounds_done']} rounds: {result['aborted']}", flush=True)
    else:
        print(f"median round {result['median_s']:.2f} s ({time.monotonic() - started:.0f} s wall)", flush=True)
    return result


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def report(results: list[dict[str, Any]], flwr: str, params: int) -> None:
    blob_mb = params * 4 / 1e6
    print()
    print(
        f"Strata vs Flower {flwr} (deployment engine), P = {params / 1e6:g}M float32 ({blob_mb:.1f} MB), "
        "FedAvg, every device every round, every device its own process"
    )
    rows = []
    for r in results:
        if "aborted" in r:
            seen = r["peak_rss_mib"] > 0  # a stopped worker reports nothing
            rows.append([r["n"], SYSTEMS[r["system"]], f"{r['rounds_done']} done", "ABORTED", "-",
                         f">{r['peak_rss_mib']:.0f}" if seen else "-", f"{r['peak_rss_server_mib']:.0f}" if seen else "-",
                         "-", "-", r["max_processes"] or "-", "-"])
            continue
        rows.append(
            [
                r["n"],
                SYSTEMS[r["system"]],
                f"1 + {r['rounds']}",
                f"{r['median_s']:.3f}",
                f"{r['p90_s']:.3f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['peak_rss_server_mib']:.0f}",
                _mb(r["payload_down_per_round"] + r["payload_up_per_round"]),
                _mb(r["loopback_per_round"]),
                r["max_processes"],
                "n/a" if r["cpu_s_per_round"] is None else f"{r['cpu_s_per_round']:.1f}",
            ]
        )
    print_table(
        ["N", "system", "rounds", "median round s", "p90 s", "peak RSS MiB", "server MiB", "payload MB/round",
         "loopback MB/round", "processes", "CPU s/round"],
        rows,
    )
    print()
    print("Strata / Flower (tuned): below 1 means Strata is faster or smaller")
    ratio_rows = []
    by = {(r["system"], r["n"]): r for r in results}
    for n in sorted({r["n"] for r in results}):
        s, f = by.get(("strata", n)), by.get(("flower", n))
        if not s or not f or "aborted" in s or "aborted" in f:
            continue
        ratio_rows.append(
            [
                n,
                _ratio(s["median_s"], f["median_s"]),
                _ratio(s["peak_rss_mib"], f["peak_rss_mib"]),
                _ratio(s["payload_down_per_round"] + s["payload_up_per_round"],
                       f["payload_down_per_round"] + f["payload_up_per_round"]),
                _ratio(s["loopback_per_round"], f["loopback_per_round"]),
                _ratio(s["cpu_s_per_round"], f["cpu_s_per_round"]),
            ]
        )
    print_table(["N", "round time", "peak RSS", "payload bytes", "loopback bytes", "CPU s/round"], ratio_rows)
    print()
    print("payload: model bytes down + update bytes up per round as each system serializes them (Strata: the")
    print("safetensors blob + signed manifest per GetModel and per SubmitUpdate, from its store and journal;")
    print("Flower: the deflated objects of the train message and each reply, counted by its ServerApp).")
    print("loopback: bytes sent on lo inside the run's own network namespace, first measured round's")
    print("opening to last one's close, per round: everything on the wire, polls and heartbeats included.")
    print("peak RSS: the largest sum of RSS over every process of the fleet at one instant (sampled every")
    print("0.25 s). CPU s/round: user+system seconds of all those processes in the measured rounds, per round")
    print("(sampled, so the last 0.25 s of a short-lived process is missed: an underestimate for Flower).")
    for r in results:
        load = f"load average {r['load_before']:.1f} before, {r['load_after']:.1f} after"
        if "aborted" in r:
            print(f"{SYSTEMS[r['system']]}, N = {r['n']}: ABORTED after {r['rounds_done']} rounds ({r['aborted']}); {load}")
        elif r["clientapp_processes"]:
            print(
                f"{SYSTEMS[r['system']]}, N = {r['n']}: {r['clientapp_processes']} flwr-clientapp processes, "
                f"each alive a median {r['clientapp_lifetime_median_s']:.1f} s; warm-up round {r['warmup_s']:.1f} s; {load}"
            )
        else:
            print(f"{SYSTEMS[r['system']]}, N = {r['n']}: warm-up round {r['warmup_s']:.1f} s; {load}")
    for r in results:
        if r["system"] != "strata" and "config" in r:
            print(f"Flower config ({SYSTEMS[r['system']]}, N = {r['n']}): {json.dumps(r['config'])}")
            break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 4, 2 rounds, 100k params")
    parser.add_argument("--devices", default="", help="comma-separated N (default 8,64)")
    parser.add_argument(
        "--rounds", default="",
        help="measured rounds: R for every N, or N:R,N:R (default 8:5,64:2, others 5; quick 2)",
    )
    parser.add_argument("--params", type=int, default=0, help=f"model parameters (default {PARAMS}; quick 100000)")
    parser.add_argument("--stock", default="", help="N at which Flower also runs with its stock settings, e.g. 8")
    parser.add_argument(
        "--what-if", default="",
        help="N at which Flower also runs with its SuperNode's fixed sleeps patched down (not as shipped), e.g. 8",
    )
    parser.add_argument("--no-netns", action="store_true", help="do not run each system in its own network namespace")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    params = args.params or (100_000 if args.quick else PARAMS)
    if args.worker:
        worker(args.worker, args.n, int(args.rounds), params, args.out)
        return 0
    if ":" in args.rounds:
        per_n = {int(k): int(v) for k, v in (pair.split(":") for pair in args.rounds.split(","))}
        rounds_for = lambda n: per_n.get(n, DEFAULT_ROUNDS)  # noqa: E731
    elif args.rounds:
        rounds_for = lambda n: int(args.rounds)  # noqa: E731
    else:
        rounds_for = lambda n: 2 if args.quick else ROUNDS.get(n, DEFAULT_ROUNDS)  # noqa: E731

    devices = [int(x) for x in args.devices.split(",") if x] or ([4] if args.quick else list(DEVICES))
    stock = {int(x) for x in args.stock.split(",") if x}
    what_if = {int(x) for x in args.what_if.split(",") if x}
    flwr = ensure_flower()
    netns = not args.no_netns and netns_available()
    if not netns:
        print("no network namespace (needs root and unshare): loopback bytes are not measured")
    results = []
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        for n in devices:
            systems = ["strata", "flower"] + (["flower-stock"] if n in stock else [])
            systems += ["flower-patched"] if n in what_if else []
            for system in systems:
                results.append(run_one(system, n, rounds_for(n), params, netns, Path(tmp)))
                if args.json:  # after every system, so a run cut short keeps what it measured
                    args.json.write_text(json.dumps({"flwr": flwr, "results": results}, indent=1))
    report(results, flwr, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
