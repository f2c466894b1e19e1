"""The FLHub experiment: does a model forked from an MNIST release train Fashion-MNIST in fewer rounds?

Run alone: `python bench/flhub.py` (`--quick` for a smoke run, `--rounds N`, `--max-batches N`;
`--from-json bench/flhub_results.json` re-reports a finished run without training).

Everything goes through the hub's real code path, against a real coordinator daemon on
127.0.0.1 (in this process; the `strata` CLI runs in-process too, through `strata.cli.main`,
because a subprocess spends ~17 s importing torch per call):
  1. `strata federation create mnist --base task:mnist`, then the fleet runner of
     bench/convergence.py (`run_fleet`: 3 in-process AggregatorDaemons x 10 AgentDaemons over
     gRPC, semi-global synthesis, non-IID two-level Dirichlet partition) trains it for
     `--source-rounds` rounds from that base;
  2. the fleet's cluster and semi-global manifests are announced to the coordinator's index
     (what an aggregator with `coordinator` set does; the fleet runs on a static ring so its
     agents' placement is the same as bench/convergence.py's), and agg-a's final semi-global
     model is released: `strata release CID --federation mnist --version 1.0.0 --evaluate mnist`;
  3. three Fashion-MNIST federations:
       (a) `strata federation create fashion-scratch --base task:fashion_mnist` (from scratch),
       (b) `strata fork mnist@1.0.0 --as fashion-whole` (every tensor copied),
       (c) `strata fork mnist@1.0.0 --as fashion-features --layers features --new-head classes=10`
           (conv1, conv2, fc1 kept; head re-initialized);
     each federation's base (the fork's CID) is its fleet's `initial_model`, and the same fleet
     shape trains it for `--rounds` rounds on the same partition of Fashion-MNIST's training set.
After each fleet, every aggregator's base after each round is evaluated on Fashion-MNIST's
10k test split (bench/convergence.py's `evaluate_fleet`). The measure: rounds (b) and (c)
take to reach (a)'s final-round accuracy, on the mean curve over the 3 aggregators and on the
worst one. Target: the better fork needs <= 50 % of (a)'s rounds.

Writes bench/flhub_results.json and bench/flhub.png (--quick writes to a temporary
directory unless --out-dir is given).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common
import convergence
from _common import print_table, quiet_logs
from convergence import Params, Setup

TARGET_FRACTION = 0.5
# lower bars than scratch's final accuracy: where on the curve the fork's head start is won or lost
THRESHOLDS = (0.5, 0.6, 0.65, 0.7, 0.75)
SOURCE_FEDERATION = "mnist"
SOURCE_VERSION = "1.0.0"
SOURCE_AGGREGATOR = "agg-a"  # whose final semi-global model is released


@dataclass(frozen=True, kw_only=True)
class Target:
    key: str
    label: str
    federation: str
    # the strata CLI call (without --coordinator/--json) that creates the federation
    create: tuple[str, ...]


SOURCE_REF = f"{SOURCE_FEDERATION}@{SOURCE_VERSION}"
TARGETS: dict[str, Target] = {
    "a": Target(key="a", label="(a) from scratch", federation="fashion-scratch",
                create=("federation", "create", "fashion-scratch", "--base", "task:fashion_mnist",
                        "--description", "Fashion-MNIST from its seeded initialization")),
    "b": Target(key="b", label="(b) forked whole", federation="fashion-whole",
                create=("fork", SOURCE_REF, "--as", "fashion-whole", "--task", "fashion_mnist")),
    "c": Target(key="c", label="(c) forked features, new head", federation="fashion-features",
                create=("fork", SOURCE_REF, "--as", "fashion-features", "--layers", "features",
                        "--new-head", "classes=10", "--task", "fashion_mnist")),
}


def _setup(key: str, label: str) -> Setup:
    # the fleet shape of every run here: 3 aggregators x 10 agents, semi-global synthesis with all peers
    return Setup(key=key, label=label, aggregators=3, synthesis=True)


class Cli:
    """`strata ...` in this process against one coordinator; returns the parsed --json output."""

    def __init__(self, coordinator: str) -> None:
        self.coordinator = coordinator
        self.calls: list[str] = []

    def __call__(self, *args: str) -> Any:
        from strata.cli import main

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main([*args, "--coordinator", self.coordinator, "--json"])
        self.calls.append("strata " + " ".join(args))
        out = json.loads(stdout.getvalue()) if stdout.getvalue().strip() else None
        if code != 0:
            raise RuntimeError(f"strata {' '.join(args)} exited {code}: {out}")
        return out


def announce_fleet(coordinator: str, fleet: dict[str, Any]) -> int:
    """Index every cluster and semi-global manifest the fleet made, as a coordinator-linked aggregator
    would have announced them, so the release and the forks' lineage reach back into its rounds."""
    from coordinator.client import CoordinatorClient
    from storage.open import open_store

    cids = [cid for records in fleet["records"].values() for r in records for cid in (r.cluster_cid, r.next_base_cid)]
    with open_store(fleet["store"]) as store, CoordinatorClient(coordinator) as client:
        results = client.announce_many((store.get(cid), None) for cid in dict.fromkeys(cids))
    return len(results)


def rounds_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The first round k whose accuracy is at least `target` (None: never within the curve)."""
    return next((k for k, accuracy in enumerate(curve) if accuracy >= target), None)


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rounds (b) and (c) take to reach (a)'s final accuracy, on the mean curve and on the worst aggregator's."""
    scratch = summaries["a"]["curves"]
    scratch_rounds = len(scratch["mean"]) - 1
    verdict: dict[str, Any] = {"scratch_rounds": scratch_rounds}
    for series in ("mean", "min"):
        target = scratch[series][-1]
        verdict[f"scratch_final_{series}"] = target
        # scratch itself may touch its final accuracy before the last round: its own count is the fair baseline
        verdict[f"a_rounds_{series}"] = rounds_to_reach(scratch[series], target)
        for key in ("b", "c"):
            if key in summaries:
                rounds = rounds_to_reach(summaries[key]["curves"][series], target)
                verdict[f"{key}_rounds_{series}"] = rounds
                verdict[f"{key}_fraction_{series}"] = None if rounds is None else rounds / scratch_rounds
    verdict["rounds_to_threshold_mean"] = {
        f"{threshold:.2f}": {key: rounds_to_reach(summary["curves"]["mean"], threshold) for key, summary in summaries.items()}
        for threshold in THRESHOLDS
    }
    forks = [verdict[f"{k}_fraction_mean"] for k in ("b", "c") if verdict.get(f"{k}_fraction_mean") is not None]
    verdict["best_fork_fraction_mean"] = min(forks) if forks else None
    verdict["target_met"] = bool(forks) and min(forks) <= TARGET_FRACTION
    return verdict


def report(results: dict[str, Any], params: Params) -> None:
    verdict, summaries = results["verdict"], results["summaries"]
    print(f"\nsource: {results['source']['release']} = {results['source']['model']}, "
          f"accuracy {results['source']['accuracy']:.4f} on MNIST's test split after {results['source']['rounds']} rounds")
    rows = []
    for key, summary in summaries.items():
        rows.append([summary["label"], f"{summary['curves']['mean'][0]:.4f}", f"{summary['final']['mean']:.4f}",
                     f"{summary['final']['min']:.4f}", _fmt(verdict.get(f"{key}_rounds_mean")),
                     _fmt(verdict.get(f"{key}_rounds_min")), f"{results['fleets'][key]['wall_s']:.0f}"])
    print(f"\nFashion-MNIST test accuracy; rounds to reach (a)'s round-{verdict['scratch_rounds']} accuracy "
          f"(mean {verdict['scratch_final_mean']:.4f}, worst aggregator {verdict['scratch_final_min']:.4f}):")
    print_table(["setup", "round 0", "final mean", "final min", "rounds (mean)", "rounds (min)", "wall s"], rows)
    checkpoints = sorted({1, 2, 3, 5, 10, 15, params.rounds} & set(range(params.rounds + 1)))
    print("\nmean accuracy after k rounds:")
    print_table(["setup", *[f"k={k}" for k in checkpoints]],
                [[key, *[f"{s['curves']['mean'][k]:.4f}" for k in checkpoints]] for key, s in summaries.items()])
    print("\nrounds to reach a fixed accuracy (mean curve):")
    print_table(["accuracy", *summaries], [[threshold, *[_fmt(r) for r in by_key.values()]]
                                           for threshold, by_key in verdict["rounds_to_threshold_mean"].items()])
    print(f"\nbest fork / scratch rounds (mean curve): {verdict['best_fork_fraction_mean']}; "
          f"target <= {TARGET_FRACTION}: {'met' if verdict['target_met'] else 'NOT met'}")


def _fmt(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "black", "b": "tab:blue", "c": "tab:orange"}
    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    for key, summary in results["summaries"].items():
        for points in results["evaluations"][key].values():
            axis.plot([p["round"] for p in points], [p["accuracy"] for p in points],
                      color=colors[key], alpha=0.35, linewidth=0.9, linestyle="--")
        mean = summary["curves"]["mean"]
        axis.plot(range(len(mean)), mean, color=colors[key], linewidth=2, label=summary["label"] + " (mean; dashed: each)")
    target = results["verdict"]["scratch_final_mean"]
    axis.axhline(target, color="gray", linewidth=0.8, linestyle=":", label=f"(a)'s final mean accuracy {target:.3f}")
    axis.set_xlabel("rounds")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel("test accuracy (Fashion-MNIST 10k)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Fashion-MNIST, 3 aggregators x 10 agents (non-IID); forks of {results['source']['release']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(params: Params, source_rounds: int, keys: Sequence[str], workdir: Path) -> dict[str, Any]:
    from agent.tasks.fashion_mnist import FashionMnistTask
    from coordinator.config import CoordinatorConfig
    from coordinator.daemon import CoordinatorDaemon

    store = workdir / "store"
    results: dict[str, Any] = {"params": asdict(params), "fleets": {}, "evaluations": {}, "summaries": {}}
    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(workdir / "coordinator"))
    with CoordinatorDaemon(config) as coordinator:
        cli = Cli(coordinator.address)

        source = cli("federation", "create", SOURCE_FEDERATION, "--base", "task:mnist",
                     "--description", "MNIST digits, trained federated: the fork source")
        source_params = Params(**{**asdict(params), "rounds": source_rounds})
        print(f"source: {SOURCE_FEDERATION}, {source_rounds} rounds from {source['base']}", flush=True)
        fleet = convergence.run_fleet(_setup("src", "source: MNIST"), source_params, workdir,
                                      task="mnist", federation=SOURCE_FEDERATION, initial_model=source["base"],
                                      store_path=store)
        announced = announce_fleet(coordinator.address, fleet)
        final = fleet["records"][SOURCE_AGGREGATOR][-1].next_base_cid
        release = cli("release", final, "--federation", SOURCE_FEDERATION, "--version", SOURCE_VERSION,
                      "--evaluate", "mnist", "--notes", f"agg-a's semi-global model after {source_rounds} rounds")
        results["source"] = {"release": release["ref"], "model": release["model"], "accuracy": release["accuracy"],
                             "rounds": source_rounds, "wall_s": round(fleet["wall_s"], 1), "announced": announced}
        print(f"  released {release['ref']} = {release['model']}: accuracy {release['accuracy']:.4f}", flush=True)

        for key in keys:
            target = TARGETS[key]
            federation = cli(*target.create)
            setup = _setup(key, target.label)
            print(f"{target.label}: {target.federation} from {federation['base']}, {params.rounds} rounds", flush=True)
            fleet = convergence.run_fleet(setup, params, workdir, task="fashion_mnist", federation=target.federation,
                                          initial_model=federation["base"], store_path=store)
            evaluate_started = time.monotonic()
            evaluations = convergence.evaluate_fleet(setup, fleet, metric=FashionMnistTask.evaluate_global)
            results["fleets"][key] = {"federation": target.federation, "base": federation["base"],
                                      "forked_from": federation.get("forked_from", ""),
                                      "kept": federation.get("kept"), "reset": federation.get("reset"),
                                      "wall_s": round(fleet["wall_s"], 1),
                                      "evaluate_s": round(time.monotonic() - evaluate_started, 1)}
            results["evaluations"][key] = evaluations
            results["summaries"][key] = convergence.summarize(setup, evaluations)
            curve = results["summaries"][key]["curves"]["mean"]
            print(f"  [{key}] trained in {fleet['wall_s']:.0f} s; mean accuracy round 0 {curve[0]:.4f}, "
                  f"final {curve[-1]:.4f}", flush=True)
        results["hub"] = cli("hub")
        results["cli_calls"] = cli.calls
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 2 agents per group, 3 batches")
    parser.add_argument("--rounds", type=int, help="Fashion-MNIST rounds per setup (default 20)")
    parser.add_argument("--source-rounds", type=int, help="MNIST rounds before the release (default 10)")
    parser.add_argument("--max-batches", type=int, help="local batches per round (default 20)")
    parser.add_argument("--setups", default="a,b,c", help="comma-separated subset of a,b,c (a is the baseline)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default bench/)")
    parser.add_argument("--from-json", type=Path, metavar="RESULTS",
                        help="train nothing: recompute the verdict, tables and plot from a results JSON this script wrote")
    args = parser.parse_args(argv)
    if args.from_json:
        return rereport(args.from_json, args.out_dir or args.from_json.parent)

    params = Params(rounds=2, agents_per_group=2, max_batches=3) if args.quick else Params(rounds=20)
    overrides = {k: v for k, v in {"rounds": args.rounds, "max_batches": args.max_batches}.items() if v is not None}
    params = Params(**{**asdict(params), **overrides})
    source_rounds = args.source_rounds or (2 if args.quick else 10)
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    if set(keys) - set(TARGETS) or "a" not in keys:
        parser.error(f"--setups: a subset of {sorted(TARGETS)} that includes a (the baseline), got {keys}")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="flhub-quick-")) if args.quick else _common.REPO / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)

    quiet_logs()
    workdir = Path(tempfile.mkdtemp(prefix="strata-flhub-"))
    # the CLI signs with the operator key under $HOME and opens $STRATA_STORE: nothing may touch the user's ~/.strata
    saved_env = {k: os.environ.get(k) for k in ("HOME", "STRATA_STORE")}
    os.environ["HOME"] = str(workdir / "home")
    os.environ["STRATA_STORE"] = str(workdir / "store")
    (workdir / "home").mkdir(parents=True)
    started = time.monotonic()
    try:
        results = run(params, source_rounds, keys, workdir)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(workdir, ignore_errors=True)
    results["verdict"] = compare(results["summaries"])
    results["total_s"] = round(time.monotonic() - started, 1)
    results["command"] = " ".join(["python", "bench/flhub.py", *(argv if argv is not None else sys.argv[1:])])
    report(results, params)
    json_path, png_path = out_dir / "flhub_results.json", out_dir / "flhub.png"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    plot(results, png_path)
    print(f"\ntotal {results['total_s']:.0f} s; wrote {json_path} and {png_path}")
    return 0


def rereport(path: Path, out_dir: Path) -> int:
    """The report of a finished run again, from its raw curves (e.g. after the verdict gained a measure)."""
    results = json.loads(path.read_text())
    results["verdict"] = compare(results["summaries"])
    report(results, Params(**results["params"]))
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    plot(results, out_dir / "flhub.png")
    print(f"\nrewrote {path} and {out_dir / 'flhub.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
