"""The model hub from the command line: federations, releases, forks, proposals, evaluation.

    strata federation create NAME --base CID|NAME@1.0.0|task:digits    strata federation list|show NAME
    strata release REF --federation NAME --version 1.2.0 [--notes ...] [--evaluate TASK]
    strata releases NAME
    strata fork NAME@1.2.0 --as NEW [--layers features --new-head classes=10]
    strata propose FORK@1.0.0 --to NAME        strata proposals [NAME]
    strata accept PROPOSAL [--release 1.3.0]   strata decline PROPOSAL
    strata evaluate REF --task digits          strata hub

Weights never travel to the coordinator: base, fork, proposal and merge models are
built here, in the store (--store), signed with the operator's manifest key (the
bundle's certified one with --bundle, else ~/.strata/operator.key), and only their
manifests go to the coordinator's hub (`coordinator.hub`). Wherever a model is
named, ``NAME@1.2.0``, ``NAME@latest`` and ``NAME@^1.0`` resolve through the
coordinator like a CID.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import STRATEGY_NAMES, round_policy_values
from coordinator.client import CoordinatorClient
from coordinator.hub import (
    Proposal,
    Release,
    ReleaseTag,
    TensorSpec,
    Version,
    check_compatible,
    check_name,
    check_tag,
    parse_ref,
)
from proto.errors import ConfigError, IntegrityError, InvalidInput, NotFound
from storage.cid import validate_cid
from storage.codec import TensorInfo, decode_tensors, encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import load_model, save_model
from strata import render
from strata.cli_common import (
    EXIT_INTEGRITY,
    EXIT_OK,
    add_actions,
    add_coordinator_options,
    add_store_option,
    channel_factory_for,
    print_json,
)
from strata.cmd_model import operator_key, resolve_store
from strata.hub_view import federation_json, hub_view, proposal_json, release_json
from trust.identity import load_certificate
from trust.signers import Signers

__all__ = ["merge_weights", "new_head", "register", "resolve_ref", "signing_identity"]

# the tensors a feature fork resets are the head's: `head.weight`, `head.bias` in the built-in tasks
DEFAULT_HEAD_PREFIX = "head."


def _with_store(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_store_option(parser)
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    federation = add_actions(commands, "federation", "the coordinator's federation registry")
    create = _with_store(federation.add_parser("create", help="register a federation with its base model"))
    create.add_argument("name", help="the federation's name, e.g. digits")
    create.add_argument(
        "--base", required=True, metavar="CID|NAME@VERSION|task:NAME",
        help="its first base model: a model in the store, a release, or a built-in task's seeded initialization",
    )  # fmt: skip
    create.add_argument("--description", default="")
    create.add_argument("--task", default="", help="the built-in task it trains (default: the task of --base task:NAME)")
    create.add_argument("--owner", action="append", default=[], metavar="ROLE/ID", help="an owner (repeatable; default: you)")
    create.add_argument(
        "--strategy", default="", help="the strategy its aggregators default to: " + " | ".join(STRATEGY_NAMES),
    )  # fmt: skip
    create.add_argument(
        "--policy", action="append", default=[], metavar="KEY=VALUE",
        help="a round-policy default its aggregators apply: a round.KEY setting, e.g. min_updates=3 (repeatable)",
    )  # fmt: skip
    create.add_argument("--seed", type=int, default=0, help="with task:NAME, the initialization seed (default: 0)")
    add_coordinator_options(create, cmd_federation_create)
    listing = federation.add_parser("list", help="every federation")
    add_coordinator_options(listing, cmd_federation_list)
    show = federation.add_parser("show", help="one federation: spec, owners, base, heads per aggregator, releases")
    show.add_argument("name")
    add_coordinator_options(show, cmd_federation_show)

    release = _with_store(commands.add_parser("release", help="tag a model with a semantic version (immutable)"))
    release.add_argument("ref", metavar="CID|NAME@VERSION", help="the model to release")
    release.add_argument("--federation", required=True)
    release.add_argument("--version", required=True, help="a semantic version, e.g. 1.2.0")
    release.add_argument("--notes", default="")
    release.add_argument("--evaluate", metavar="TASK", default="", help="measure accuracy on TASK's held-out split and record it")
    release.add_argument("--evaluation", default="", help="the name of an evaluation measured elsewhere (with --accuracy)")
    release.add_argument("--accuracy", type=float, default=None, help="its accuracy in [0, 1]")
    add_coordinator_options(release, cmd_release)

    releases = commands.add_parser("releases", help="a federation's releases, newest version first")
    releases.add_argument("name")
    releases.add_argument(
        "--ca", type=Path, metavar="FLEET-CA.PEM",
        help="check each tag offline: signed by a key the fleet CA certified to its releaser; exit 4 on any that is not",
    )  # fmt: skip
    releases.add_argument("--limit", type=int, default=0, help="the newest N versions only (default: 0, all)")
    add_coordinator_options(releases, cmd_releases)

    fork = _with_store(commands.add_parser("fork", help="a new federation from another's model, whole or its feature layers"))
    fork.add_argument("ref", metavar="NAME@VERSION|CID")
    fork.add_argument("--as", dest="new_name", required=True, metavar="NEW", help="the new federation's name")
    fork.add_argument("--layers", choices=("all", "features"), default="all", help="copy every tensor, or the backbone only")
    fork.add_argument("--new-head", default="", metavar="classes=N", help="with --layers features: the new head's classes")
    fork.add_argument("--head-prefix", default=DEFAULT_HEAD_PREFIX, help=f"names of the head's tensors (default: {DEFAULT_HEAD_PREFIX})")
    fork.add_argument("--task", default="", help="the task the fork trains (default: the source federation's)")
    fork.add_argument("--description", default="")
    fork.add_argument("--seed", type=int, default=0, help="seed of the new head's initialization (default: 0)")
    add_coordinator_options(fork, cmd_fork)

    propose = _with_store(commands.add_parser("propose", help="offer a fork's model back to a federation"))
    propose.add_argument("ref", metavar="FORK@VERSION|CID")
    propose.add_argument("--to", dest="target", required=True, metavar="NAME")
    add_coordinator_options(propose, cmd_propose)

    proposals = commands.add_parser("proposals", help="proposals to a federation (or to all)")
    proposals.add_argument("name", nargs="?", default="")
    proposals.add_argument("--state", default="", choices=("", "open", "accepted", "declined"))
    proposals.add_argument("--limit", type=int, default=0, help="the oldest N only (default: 0, all)")
    add_coordinator_options(proposals, cmd_proposals)

    accept = _with_store(commands.add_parser("accept", help="merge a proposal (weighted average of the shared tensors) as the new base"))
    accept.add_argument("proposal", metavar="PROPOSAL_CID")
    accept.add_argument("--release", default="", metavar="VERSION", help="also release the merge under this version")
    accept.add_argument("--notes", default="")
    add_coordinator_options(accept, cmd_accept)

    decline = commands.add_parser("decline", help="decline a proposal")
    decline.add_argument("proposal", metavar="PROPOSAL_CID")
    add_coordinator_options(decline, cmd_decline)

    evaluate = _with_store(commands.add_parser("evaluate", help="a model's accuracy on a built-in task's held-out split"))
    evaluate.add_argument("ref", metavar="CID|NAME@VERSION")
    evaluate.add_argument("--task", required=True, help="digits | mnist")
    add_coordinator_options(evaluate, cmd_evaluate)

    hub = commands.add_parser("hub", help="federations, releases, forks and proposals at a glance")
    add_coordinator_options(hub, cmd_hub)


# ---------------------------------------------------------------- shared steps


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return CoordinatorClient(args.coordinator, timeout_s=args.timeout, channel_factory=channel_factory_for(args))


def signing_identity(args: argparse.Namespace) -> tuple[Producer, KeyPair]:
    """Who signs what this command makes: the bundle's certified identity and key (what the coordinator
    checks with TLS), else the local operator key under $USER (plaintext fleets prove nothing anyway)."""
    if getattr(args, "bundle", ""):
        from trust.security import Security

        security = Security(args.bundle)
        identity = security.identity
        return Producer(role=identity.role.value, id=identity.id), security.manifest_key
    return Producer(role="operator", id=os.environ.get("USER") or "operator"), operator_key()


def resolve_ref(ref: str, client: CoordinatorClient | None = None, *, args: argparse.Namespace | None = None) -> str:
    """A CID as is (validated); NAME@VERSION, NAME@latest or NAME@^1.0 through the coordinator's hub."""
    if parse_ref(ref) is None:
        return validate_cid(ref) or ref
    if client is not None:
        return client.resolve(ref)[0]
    assert args is not None
    address = getattr(args, "coordinator", "") or os.environ.get("STRATA_COORDINATOR") or "127.0.0.1:7000"
    timeout = getattr(args, "timeout", 5.0)
    with CoordinatorClient(address, timeout_s=timeout, channel_factory=channel_factory_for(args)) as coordinator:
        return coordinator.resolve(ref)[0]


def _parse_policy(entries: list[str]) -> dict[str, str]:
    policy = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--policy takes KEY=VALUE, got {entry!r}", reason="bad_argument")
        policy[key] = value
    return policy


def _check_defaults(policy: dict[str, str], strategy: str) -> None:
    """Refuse defaults no aggregator could honour (it would refuse to start with them), before the coordinator
    is asked: the coordinator checks their shape only, since it does not know the aggregator's settings."""
    try:
        round_policy_values(policy)
    except ConfigError as exc:
        raise InvalidInput(f"--policy: {exc.message}", reason="bad_round_policy") from None
    if strategy and strategy not in STRATEGY_NAMES:
        raise InvalidInput(
            f"--strategy must be one of {', '.join(STRATEGY_NAMES)}, got {strategy!r}", reason="bad_strategy"
        )


def _accuracy_on(task_name: str, weights: bytes) -> float:
    """Accuracy of safetensors `weights` on the built-in task's held-out split."""
    from agent.tasks import builtin_task

    task = builtin_task(task_name)
    tensors = decode_tensors(weights)
    expected = task.seeded_weights(0)
    mismatched = [
        f"{name}: {list(tensors[name].shape) if name in tensors else 'missing'} vs {list(value.shape)}"
        for name, value in expected.items()
        if name not in tensors or tuple(tensors[name].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise InvalidInput(
            f"the model does not fit task {task_name!r}: {'; '.join(mismatched[:5])}", reason="incompatible_shapes"
        )
    return float(task.evaluate_global(tensors)["accuracy"])


# ---------------------------------------------------------------- federations


def cmd_federation_create(args: argparse.Namespace) -> int:
    check_name(args.name)
    policy = _parse_policy(args.policy)
    _check_defaults(policy, args.strategy)
    producer, key = signing_identity(args)
    task = args.task
    with _client(args) as coordinator, resolve_store(args) as store:
        if args.base.startswith("task:"):
            from agent.tasks import builtin_task

            task_name = args.base.removeprefix("task:")
            weights = encode_tensors(builtin_task(task_name).seeded_weights(args.seed))
            task = task or task_name
            manifest = save_model(
                store, weights=weights, kind="base", federation=args.name, round=0, producer=producer, key=key,
                algorithm={"name": "init", "task": task_name, "seed": args.seed},
            )  # fmt: skip
        else:
            source_cid = resolve_ref(args.base, coordinator)
            source, weights = load_model(store, source_cid)
            if source.kind == "base" and source.federation == args.name and source.producer == producer:
                manifest = source  # our own base model for this federation: the coordinator indexes it as is
            else:  # another's or another federation's model: a new base that names it, so lineage crosses over
                manifest = save_model(
                    store, weights=weights, kind="base", federation=args.name, round=0, producer=producer, key=key,
                    parents=[source_cid],
                )  # fmt: skip
        federation = coordinator.create_federation(
            args.name, manifest.to_bytes(), description=args.description, task=task, owners=args.owner,
            round_policy=policy, strategy=args.strategy,
        )  # fmt: skip
    if args.json:
        print_json(federation_json(federation))
    else:
        print(f"federation {federation.name} created; base {federation.base} ({len(federation.spec)} tensors)")
    return EXIT_OK


def cmd_federation_list(args: argparse.Namespace) -> int:
    with _client(args) as coordinator:
        federations = coordinator.federations()
    rows = [
        {
            "name": f.name,
            "task": f.task or "-",
            "base": f.base,
            "forked_from": f"{f.source_federation} ({f.fork_layers})" if f.forked_from else "-",
            "owners": ",".join(f.owners) or "-",
            "description": f.description[:60],
        }
        for f in federations
    ]
    if args.json:
        print_json({"federations": [federation_json(f) for f in federations]})
    else:
        print(render.table(rows, ["name", "task", "base", "forked_from", "owners", "description"]))
    return EXIT_OK


def cmd_federation_show(args: argparse.Namespace) -> int:
    with _client(args) as coordinator:
        federation = coordinator.federation(args.name)
        releases = coordinator.releases(args.name)
    if args.json:
        print_json(federation_json(federation, releases))
        return EXIT_OK
    lines = [
        f"federation {federation.name}",
        f"  description  {federation.description or '-'}",
        f"  task         {federation.task or '-'}",
        f"  base         {federation.base}",
        f"  owners       {', '.join(federation.owners) or '-'}",
        f"  strategy     {federation.strategy or '-'}",
        f"  round policy {', '.join(f'{k}={v}' for k, v in federation.round_policy.items()) or '-'}",
    ]
    if federation.forked_from:
        lines.append(f"  forked from  {federation.forked_from} ({federation.source_federation}, {federation.fork_layers})")
    lines.append("  spec")
    lines += [f"    {s.name:<24} {s.dtype:<5} {list(s.shape)}" for s in federation.spec]
    lines.append("  heads")
    lines += [f"    {aggregator:<24} {cid}" for aggregator, cid in sorted(federation.heads.items())] or ["    (none yet)"]
    lines.append("  releases")
    lines += [f"    {r.version:<12} {r.model}" for r in releases] or ["    (none yet)"]
    print("\n".join(lines))
    return EXIT_OK


# ---------------------------------------------------------------- releases


def _make_release(
    coordinator: CoordinatorClient, args: argparse.Namespace, *, federation: str, version: str, model: str,
    notes: str, evaluation: str = "", accuracy: float | None = None,
) -> Release:  # fmt: skip
    Version.parse(version)
    if accuracy is not None and not (math.isfinite(accuracy) and 0 <= accuracy <= 1):
        raise InvalidInput(f"--accuracy must be in [0, 1], got {accuracy}", reason="bad_accuracy")
    producer, key = signing_identity(args)
    tag = ReleaseTag(
        federation=federation, version=version, model=model, released_by=f"{producer.role}/{producer.id}",
        notes=notes, evaluation=evaluation, accuracy=accuracy,
    ).signed(key)  # fmt: skip
    return coordinator.release(tag.to_bytes())


def cmd_release(args: argparse.Namespace) -> int:
    if args.evaluate and (args.evaluation or args.accuracy is not None):
        raise InvalidInput("give --evaluate TASK, or --evaluation NAME --accuracy X, not both", reason="usage")
    if (args.accuracy is None) != (not args.evaluation):
        raise InvalidInput("--evaluation and --accuracy go together", reason="usage")
    with _client(args) as coordinator:
        model = resolve_ref(args.ref, coordinator)
        evaluation, accuracy = args.evaluation, args.accuracy
        if args.evaluate:
            with resolve_store(args) as store:
                _, weights = load_model(store, model)
            evaluation, accuracy = f"task:{args.evaluate}/test", _accuracy_on(args.evaluate, weights)
        release = _make_release(
            coordinator, args, federation=args.federation, version=args.version, model=model, notes=args.notes,
            evaluation=evaluation, accuracy=accuracy,
        )  # fmt: skip
    if args.json:
        print_json(release_json(release))
    else:
        measured = f", accuracy {release.accuracy:.4f} on {release.evaluation}" if release.accuracy is not None else ""
        print(f"released {release.ref} = {release.model} (by {release.released_by or 'unauthenticated caller'}{measured})")
    return EXIT_OK


def _limit(args: argparse.Namespace) -> int:
    if not 0 <= args.limit < 2**32:
        raise InvalidInput(f"--limit must be in 0..2^32-1 (0: all), got {args.limit}", reason="usage")
    return args.limit


def cmd_releases(args: argparse.Namespace) -> int:
    signers = None
    if args.ca is not None:
        if not args.ca.is_file():
            raise NotFound(f"--ca: no such file: {args.ca}", reason="file_not_found")
        signers = Signers(load_certificate(args.ca.read_bytes()))
    with _client(args) as coordinator:
        releases = coordinator.releases(args.name, limit=_limit(args))
    rows = []
    for release in releases:
        row = release_json(release)
        try:  # every tag's signature is checked; with --ca, its certified signer too
            row["signed_by"] = check_tag(release.tag, signers) or "(signature ok; no --ca)"
        except IntegrityError as exc:
            row.update(signed_by="-", problem=exc.reason, message=str(exc))
        rows.append(row)
    ok = not any("problem" in row for row in rows)
    if args.json:
        print_json({"federation": args.name, "ok": ok, "releases": rows})
    else:
        print(render.table(rows, ["version", "model", "accuracy", "evaluation", "released_by", "signed_by", "notes"]))
        for row in rows:
            if "problem" in row:
                print(f"  {row['version']}: {row['problem']}: {row['message']}")
    return EXIT_OK if ok else EXIT_INTEGRITY


# ---------------------------------------------------------------- forks


@dataclass(frozen=True, kw_only=True)
class _Head:
    classes: int


def _parse_head(text: str) -> _Head:
    key, sep, value = text.partition("=")
    if key != "classes" or not sep or not value.isdigit() or not 0 < int(value) <= 1_000_000:
        raise InvalidInput(f"--new-head takes classes=N (N > 0), got {text!r}", reason="bad_argument")
    return _Head(classes=int(value))


def new_head(tensors: dict[str, np.ndarray], prefix: str, classes: int, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """`tensors` with the head (names starting with `prefix`) re-initialized for `classes` outputs; and the names reset.

    Initialized like torch's nn.Linear: uniform in ±1/sqrt(fan_in), from `seed`, so a fork is reproducible."""
    head = sorted(name for name in tensors if name.startswith(prefix))
    if not head:
        raise InvalidInput(f"no tensor name starts with {prefix!r}: which layers are the head? (--head-prefix)", reason="no_head")
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for name in head:
        old = tensors[name]
        shape = (classes, *old.shape[1:]) if old.ndim >= 1 else old.shape
        fan_in = int(np.prod(old.shape[1:])) if old.ndim >= 2 else int(next(
            (np.prod(tensors[n].shape[1:]) for n in head if tensors[n].ndim >= 2), 1
        ))  # fmt: skip
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        out[name] = rng.uniform(-bound, bound, size=shape).astype(old.dtype)
    return out, head


def cmd_fork(args: argparse.Namespace) -> int:
    check_name(args.new_name)
    head = _parse_head(args.new_head) if args.new_head else None
    if (args.layers == "features") != (head is not None):
        raise InvalidInput("--layers features needs --new-head classes=N (and --new-head needs --layers features)", reason="usage")
    producer, key = signing_identity(args)
    with _client(args) as coordinator, resolve_store(args) as store:
        source_cid = resolve_ref(args.ref, coordinator)
        source, weights = load_model(store, source_cid)
        names = sorted(source.tensors)
        reset: list[str] = []
        if head is not None:
            tensors, reset = new_head(decode_tensors(weights), args.head_prefix, head.classes, args.seed)
            weights = encode_tensors(tensors)
        kept = [n for n in names if n not in reset]
        fork_extra: dict[str, Any] = {
            "source": source_cid, "source_federation": source.federation, "ref": args.ref, "layers": args.layers,
            "kept": kept, "reset": reset,
        }  # fmt: skip
        if head is not None:
            fork_extra.update(new_head={"classes": head.classes, "prefix": args.head_prefix, "seed": args.seed})
        manifest = save_model(
            store, weights=weights, kind="fork", federation=args.new_name, round=0, producer=producer, key=key,
            parents=[source_cid], algorithm={"name": "fork", "layers": args.layers}, extra={"fork": fork_extra},
        )  # fmt: skip
        task = args.task
        if not task:
            try:
                task = coordinator.federation(source.federation).task
            except NotFound:
                task = ""
        federation = coordinator.create_federation(
            args.new_name, manifest.to_bytes(), task=task,
            description=args.description or f"fork of {args.ref} ({args.layers})",
        )  # fmt: skip
    if args.json:
        print_json({**federation_json(federation), "kept": kept, "reset": reset})
    else:
        print(
            f"federation {federation.name} forked from {source_cid} ({source.federation}); base {federation.base}: "
            f"{len(kept)} tensors kept, {len(reset)} reset"
        )
    return EXIT_OK


# ---------------------------------------------------------------- proposals


def cmd_propose(args: argparse.Namespace) -> int:
    producer, key = signing_identity(args)
    with _client(args) as coordinator, resolve_store(args) as store:
        model_cid = resolve_ref(args.ref, coordinator)
        target = coordinator.federation(args.target)
        model, weights = load_model(store, model_cid)
        check_compatible(target.spec, [_spec(n, t) for n, t in model.tensors.items()])
        manifest = save_model(
            store, weights=weights, kind="proposal", federation=target.name, round=0, producer=producer, key=key,
            parents=[target.base, model_cid], num_samples=model.num_samples, metrics=model.metrics,
            extra={"proposal": {"from": model.federation, "ref": args.ref}},
        )  # fmt: skip
        proposal = coordinator.propose(manifest.to_bytes())
    if args.json:
        print_json(proposal_json(proposal))
    else:
        print(f"proposal {proposal.cid}: {proposal.from_federation} -> {proposal.to_federation} (model {proposal.model})")
    return EXIT_OK


def _spec(name: str, info: TensorInfo) -> TensorSpec:
    return TensorSpec(name=name, dtype=info.dtype, shape=tuple(info.shape))


def cmd_proposals(args: argparse.Namespace) -> int:
    with _client(args) as coordinator:
        proposals = coordinator.proposals(args.name, args.state, limit=_limit(args))
    if args.json:
        print_json({"proposals": [proposal_json(p) for p in proposals]})
    else:
        print(render.table([proposal_json(p) for p in proposals], ["proposal", "from", "to", "model", "state", "proposed_by"]))
    return EXIT_OK


def _find_proposal(coordinator: CoordinatorClient, cid: str) -> Proposal:
    validate_cid(cid)
    for proposal in coordinator.proposals():
        if proposal.cid == cid:
            return proposal
    raise NotFound(f"no proposal {cid}", reason="unknown_proposal")


def merge_weights(
    head: dict[str, np.ndarray], proposed: dict[str, np.ndarray], weights: tuple[float, float]
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """The head's tensors with every tensor both share (same shape and dtype) replaced by their weighted average.

    Returns (tensors, averaged names, kept names); the inputs are not modified."""
    total = weights[0] + weights[1]
    merged, averaged, kept = {}, [], []
    for name, mine in head.items():
        theirs = proposed.get(name)
        if theirs is not None and theirs.shape == mine.shape and theirs.dtype == mine.dtype:
            mixed = (mine.astype(np.float64) * weights[0] + theirs.astype(np.float64) * weights[1]) / total
            merged[name] = mixed.astype(mine.dtype)
            averaged.append(name)
        else:
            merged[name] = mine.copy()
            kept.append(name)
    return merged, averaged, kept


def cmd_accept(args: argparse.Namespace) -> int:
    if args.release:
        Version.parse(args.release)
    producer, key = signing_identity(args)
    with _client(args) as coordinator, resolve_store(args) as store:
        proposal = _find_proposal(coordinator, args.proposal)
        head_manifest, head_weights = load_model(store, proposal.target_head)
        proposed_manifest, proposed_weights = load_model(store, proposal.model)
        check_compatible(
            [_spec(n, t) for n, t in head_manifest.tensors.items()],
            [_spec(n, t) for n, t in proposed_manifest.tensors.items()],
        )
        # weighted by the samples each side was trained on; models that claim none count equally
        claims = (head_manifest.num_samples, proposed_manifest.num_samples)
        shares = (float(claims[0]), float(claims[1])) if all(claims) else (1.0, 1.0)
        tensors, averaged, kept = merge_weights(decode_tensors(head_weights), decode_tensors(proposed_weights), shares)
        merge = save_model(
            store, weights=encode_tensors(tensors), kind="merge", federation=proposal.to_federation, round=0,
            producer=producer, key=key, parents=[proposal.target_head, proposal.model], num_samples=sum(claims),
            algorithm={"name": "weighted_average", "weights": list(shares)},
            extra={"merge": {"proposal": proposal.cid, "averaged": averaged, "kept": kept}},
        )  # fmt: skip
        decided = coordinator.decide(proposal.cid, accept=True, merge_manifest=merge.to_bytes())
        release = None
        if args.release:
            release = _make_release(
                coordinator, args, federation=proposal.to_federation, version=args.release, model=merge.cid,
                notes=args.notes or f"merge of proposal {proposal.cid}",
            )  # fmt: skip
    if args.json:
        print_json({**proposal_json(decided), "averaged": averaged, "kept": kept, "release": release_json(release) if release else None})
    else:
        print(f"accepted {proposal.cid}: merge {merge.cid} is {proposal.to_federation}'s new base "
              f"({len(averaged)} tensors averaged, {len(kept)} kept)" + (f"; released {release.ref}" if release else ""))
    return EXIT_OK


def cmd_decline(args: argparse.Namespace) -> int:
    validate_cid(args.proposal)
    with _client(args) as coordinator:
        decided = coordinator.decide(args.proposal, accept=False)
    if args.json:
        print_json(proposal_json(decided))
    else:
        print(f"declined {decided.cid}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    with _client(args) as coordinator:
        model = resolve_ref(args.ref, coordinator) if parse_ref(args.ref) is not None else validate_cid(args.ref) or args.ref
    with resolve_store(args) as store:
        _, weights = load_model(store, model)
    accuracy = _accuracy_on(args.task, weights)
    if args.json:
        print_json({"model": model, "task": args.task, "split": "test", "accuracy": accuracy})
    else:
        print(f"{model}: accuracy {accuracy:.4f} on {args.task}'s held-out split")
    return EXIT_OK


# ---------------------------------------------------------------- the hub view


def cmd_hub(args: argparse.Namespace) -> int:
    with _client(args) as coordinator:
        view = hub_view(coordinator)
    if args.json:
        print_json(view)
        return EXIT_OK
    rows = [
        {
            "federation": f["name"],
            "task": f["task"] or "-",
            "latest": f["releases"][0]["version"] if f["releases"] else "-",
            "releases": len(f["releases"]),
            "forked_from": f"{f['source_federation']} ({f['fork_layers']})" if f["forked_from"] else "-",
            "open_proposals": sum(p["to"] == f["name"] and p["state"] == "open" for p in view["proposals"]),
        }
        for f in view["federations"]
    ]
    print("federations")
    print(render.table(rows, ["federation", "task", "latest", "releases", "forked_from", "open_proposals"]))
    print("\nproposals")
    print(render.table(view["proposals"], ["proposal", "from", "to", "state", "proposed_by"]))
    return EXIT_OK
