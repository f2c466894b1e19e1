"""`strata model put|show|export`, `strata lineage` and `strata verify`.

`strata verify CID` re-hashes the lineage and checks each signature against the key
its manifest names (self-consistency). With `--ca fleet-ca.pem` it also checks every
signer against the fleet CA (`trust.signers`): each manifest must embed a
certificate the CA issued to its producer (role and id), certifying the key that
signed it and valid at its ``created_at``; with `--revocations` a revoked signer
fails too. It prints who signed what, and exits 4 on an unknown signer, a
certificate from another CA, a revoked signer or any mismatch.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proto.errors import InvalidInput, NotFound
from storage.cid import validate_cid
from storage.codec import CodecError, decode_torch, encode_tensors
from storage.encodings import read_update
from storage.keys import KeyPair
from storage.lineage import LineageGraph, verify, walk
from storage.manifest import KINDS, Producer
from storage.models import load_manifest, load_model, save_model
from storage.open import open_store
from storage.store import ContentStore, LayeredStore, default_store_path
from strata import render
from strata.cli_common import (
    EXIT_INTEGRITY,
    EXIT_OK,
    add_actions,
    add_bundle_option,
    add_json_option,
    add_store_option,
    channel_factory_for,
    print_json,
)
from strata.progress import progress
from trust.identity import load_certificate
from trust.revocation import RevocationList
from trust.signers import SignerError, Signers


def resolve_store(args: argparse.Namespace) -> ContentStore:
    """--store (repeatable: read in order, e.g. an aggregator's store then a relay's), else
    $STRATA_STORE, else ~/.strata/store."""
    urls = getattr(args, "store", None) or [os.environ.get("STRATA_STORE") or str(default_store_path())]
    if isinstance(urls, str):
        urls = [urls]
    stores = [open_store(url) for url in urls]
    return stores[0] if len(stores) == 1 else LayeredStore(stores)


def operator_key() -> KeyPair:
    """The operator's signing key, created on first use under ~/.strata."""
    return KeyPair.load_or_create(Path(os.path.expanduser("~")) / ".strata" / "operator.key")


def _store_command(
    parent: argparse._SubParsersAction,
    name: str,
    help: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    on_model: bool = True,
) -> argparse.ArgumentParser:
    """A command that reads or writes the store: --store and --json, and (`on_model`) a model ID."""
    parser = parent.add_parser(name, help=help)
    if on_model:
        parser.add_argument(
            "cid", metavar="MODEL", help="model ID (the manifest's CID), or a release: NAME@1.2.0, NAME@latest, NAME@^1.0"
        )
    add_store_option(parser)
    add_json_option(parser)
    parser.set_defaults(handler=handler)
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    model = add_actions(commands, "model", "store, inspect and export models")

    put = _store_command(
        model, "put", "import a .safetensors file or a PyTorch state_dict as a model", cmd_put, on_model=False
    )
    put.add_argument("file", type=Path, help=".safetensors, or a state_dict saved with torch.save (.pt/.pth)")
    put.add_argument("--federation", required=True, help="the model family, e.g. digits")
    put.add_argument("--kind", default="base", choices=KINDS, help="manifest kind (default: base)")
    put.add_argument("--round", type=int, default=0, help="round number recorded in the manifest (default: 0)")
    put.add_argument("--parent", action="append", default=[], metavar="CID", help="a parent model (repeatable)")

    _store_command(model, "show", "a model's manifest, tensor summary and weights CID", cmd_show)

    export = _store_command(model, "export", "write a model's weights to .safetensors or .pt", cmd_export)
    export.add_argument("-o", "--output", type=Path, required=True, help="out.safetensors or out.pt")

    for name in ("show", "export"):
        _add_resolver(model.choices[name])

    lineage = _store_command(commands, "lineage", "a model's ancestry down to the device updates", cmd_lineage)
    lineage.add_argument("--depth", type=int, default=None, help="how many generations to walk (default: all)")
    lineage.add_argument("--format", choices=("tree", "dot", "json"), default="tree", help="output format (default: tree)")
    lineage.add_argument(
        "--bases",
        action="store_true",
        help="also follow each model's base (what it was trained from): back through earlier rounds and, across a "
        "fork or merge, into the source federation's rounds; bound it with --depth",
    )
    lineage.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=os.environ.get("STRATA_COORDINATOR", ""),
        help="answer from the coordinator's model index (default: $STRATA_COORDINATOR; else the store)",
    )
    add_bundle_option(lineage)

    verify_parser = _store_command(
        commands, "verify", "re-hash a model's whole lineage, weights and signatures; exit 4 on any mismatch", cmd_verify
    )
    _add_resolver(verify_parser)
    verify_parser.add_argument(
        "--ca",
        type=Path,
        metavar="FLEET-CA.PEM",
        help="also check every signer against this fleet CA: each manifest must embed a certificate the CA issued "
        "to its producer, certifying the key that signed it, valid when it was made; prints who signed what",
    )
    verify_parser.add_argument(
        "--revocations",
        type=Path,
        metavar="FILE",
        help="with --ca: the CA's signed revocation list (e.g. ~/.strata/ca/revocations.json); a revoked signer fails",
    )


def _add_resolver(parser: argparse.ArgumentParser) -> None:
    """--coordinator and --bundle: where a release name (NAME@VERSION) is resolved."""
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=os.environ.get("STRATA_COORDINATOR", ""),
        help="resolve NAME@VERSION through this coordinator (default: $STRATA_COORDINATOR, else 127.0.0.1:7000)",
    )
    add_bundle_option(parser)


def model_id(args: argparse.Namespace) -> str:
    """`args.cid` as a model CID: a CID is checked; NAME@1.2.0, NAME@latest or NAME@^1.0 is resolved by the
    coordinator's hub (NotFound reason "unknown_release" when no release matches)."""
    from coordinator.client import CoordinatorClient
    from coordinator.hub import parse_ref

    if parse_ref(args.cid) is None:
        validate_cid(args.cid)
        return args.cid
    address = getattr(args, "coordinator", "") or os.environ.get("STRATA_COORDINATOR") or "127.0.0.1:7000"
    with CoordinatorClient(address, channel_factory=channel_factory_for(args)) as coordinator:
        return coordinator.resolve(args.cid)[0]


def _read_tensors(path: Path) -> bytes:
    if not path.is_file():
        raise NotFound(f"no such file: {path}", reason="file_not_found")
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        decode_torch(data)  # validates header and data before anything is stored
        return data
    if path.suffix in (".pt", ".pth", ".bin"):
        import torch

        try:
            # weights_only: a state_dict file is a stranger's input and must not run code;
            # torch warns about pickle protocols on stderr, which would break the one-line error
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise InvalidInput(
                f"{path} is not a loadable PyTorch state_dict (only tensors are accepted): {first_line}",
                reason="bad_state_dict",
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InvalidInput(f"{path} does not hold a dict of tensors (a state_dict)", reason="bad_state_dict")
        return encode_tensors(state)
    raise InvalidInput(f"{path}: expected a .safetensors, .pt or .pth file", reason="bad_file_type")


def cmd_put(args: argparse.Namespace) -> int:
    for parent in args.parent:
        validate_cid(parent)
    # the steps: read (and convert a state_dict), then store: an upload when the store is IPFS
    with progress(args, f"importing {Path(args.file).name}", total=2) as advance:
        weights = _read_tensors(args.file)
        advance(1, 2)
        key = operator_key()
        with resolve_store(args) as store:
            manifest = save_model(
                store,
                weights=weights,
                kind=args.kind,
                federation=args.federation,
                round=args.round,
                producer=Producer(role="operator", id=os.environ.get("USER", "operator")),
                key=key,
                parents=args.parent,
            )
        advance(2, 2)
    if args.json:
        print_json({"model": manifest.cid, "weights": manifest.weights, "kind": manifest.kind})
    else:
        print(manifest.cid)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    args.cid = model_id(args)
    with resolve_store(args) as store:
        manifest = load_manifest(store, args.cid)
    if args.json:
        print_json({"model": args.cid, "manifest": manifest.to_json()})
    else:
        print(render.manifest_text(args.cid, manifest))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    args.cid = model_id(args)
    output: Path = args.output
    if output.suffix not in (".safetensors", ".pt", ".pth"):
        raise InvalidInput(f"{output}: the output must end in .safetensors, .pt or .pth", reason="bad_file_type")
    # the steps: read and verify the weights (from IPFS, possibly slow), convert for torch, write
    steps = 2 if output.suffix == ".safetensors" else 3
    with progress(args, f"exporting {args.cid[:12]}…", total=steps) as advance:
        with resolve_store(args) as store:
            manifest, weights = load_model(store, args.cid)
            if manifest.extra.get("encoding"):
                # an encoded device update (storage.encodings): export the weights it stands for, not its delta
                weights = encode_tensors(read_update(store, args.cid))
        advance(1, steps)
        if output.suffix == ".safetensors":
            output.write_bytes(weights)
        else:
            import torch

            state = decode_torch(weights)
            advance(2, steps)
            torch.save(state, output)
        advance(steps, steps)
    if args.json:
        print_json({"model": args.cid, "weights": manifest.weights, "output": str(output)})
    else:
        print(f"wrote {output} ({len(manifest.tensors)} tensors, weights {manifest.weights})")
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    args.cid = model_id(args)
    if args.depth is not None and args.depth < 0:
        raise InvalidInput("--depth must be >= 0", reason="bad_depth")
    if args.coordinator:
        from strata.cmd_fleet import lineage_from_index

        view = lineage_from_index(
            args.coordinator, args.cid, args.depth, follow_base=args.bases, channel_factory=channel_factory_for(args)
        )
    else:
        with resolve_store(args) as store:
            graph = walk(store, args.cid, depth=args.depth, follow_base=args.bases)
        if args.cid not in graph.nodes:
            problem = graph.problems[0] if graph.problems else None
            if problem is not None and problem.reason == "missing":
                raise NotFound(f"model {args.cid} is not in the store", reason="not_found")
        view = render.view_from_graph(graph)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print_json(render.lineage_json(view))
    elif fmt == "dot":
        print(render.lineage_dot(view))
    else:
        print(render.lineage_tree(view))
    # showing a lineage with some ancestors out of reach (e.g. device updates held in a
    # relay's private store) is not a failure; a node that does not verify is
    broken = [p for p in view.problems if p["reason"] != "missing"]
    return EXIT_OK if not broken else EXIT_INTEGRITY


def _signers(args: argparse.Namespace) -> Signers | None:
    """The fleet's signer check from --ca (and --revocations), or None without --ca."""
    if args.revocations is not None and args.ca is None:
        raise InvalidInput("--revocations needs --ca (the CA that signed the list)", reason="usage")
    if args.ca is None:
        return None
    ca_pem = _read_file(args.ca, "--ca")
    revocations = None
    if args.revocations is not None:
        revocations = RevocationList.from_bytes(_read_file(args.revocations, "--revocations"))
    # a list the CA did not sign is an integrity failure (exit 4), like any other signature
    return Signers(load_certificate(ca_pem), revocations=revocations)


def _read_file(path: Path, option: str) -> bytes:
    if not path.is_file():
        raise NotFound(f"{option}: no such file: {path}", reason="file_not_found")
    return path.read_bytes()


def _signer_rows(graph: LineageGraph, signers: Signers) -> list[dict[str, Any]]:
    """Who signed each model of the lineage read, in walk order (or why its signer does not count)."""
    rows = []
    for cid, manifest in graph.nodes.items():
        row: dict[str, Any] = {
            "cid": cid,
            "kind": manifest.kind,
            "producer": f"{manifest.producer.role}/{manifest.producer.id}",
        }
        try:
            row["signer"] = signers.check(manifest).to_json()
        except SignerError as exc:
            row.update(problem=exc.reason, message=str(exc))
        rows.append(row)
    return rows


def cmd_verify(args: argparse.Namespace) -> int:
    args.cid = model_id(args)
    signers = _signers(args)
    with resolve_store(args) as store, progress(args, "verifying the lineage") as advance:
        try:
            graph = verify(store, args.cid, on_node=advance)
        except CodecError as exc:
            raise InvalidInput(str(exc), reason=exc.reason) from None
    if any(p.cid == args.cid and p.reason == "missing" for p in graph.problems):
        raise NotFound(f"model {args.cid} is not in the store", reason="not_found")
    problems = [{"cid": p.cid, "where": p.where, "reason": p.reason, "message": p.message} for p in graph.problems]
    rows = _signer_rows(graph, signers) if signers is not None else []
    # a bad or missing signature is already a lineage problem; every other signer problem is one more
    signed_badly = {(p.cid, p.reason) for p in graph.problems}
    problems += [
        {"cid": row["cid"], "where": "signer", "reason": row["problem"], "message": row["message"]}
        for row in rows
        if "problem" in row and (row["cid"], row["problem"]) not in signed_badly
    ]
    ok = not problems
    result: dict[str, Any] = {"model": args.cid, "ok": ok, "models_checked": len(graph.nodes), "problems": problems}
    if signers is not None:
        result.update(fleet=signers.fleet, signers=rows)
    if args.json:
        print_json(result)
        return EXIT_OK if ok else EXIT_INTEGRITY
    if ok:
        certified = f"; every signer is certified by fleet {signers.fleet}'s CA" if signers is not None else ""
        print(f"ok: {len(graph.nodes)} model(s), their weights and signatures verify{certified}")
    else:
        print(f"FAILED: {len(problems)} problem(s) in {len(graph.nodes)} model(s) read")
        for problem in problems:
            print(f"  {problem['reason']}: {problem['cid']} ({problem['where']}): {problem['message']}")
    if rows:
        print("signers:")
        print(render.signers_text(rows))
    return EXIT_OK if ok else EXIT_INTEGRITY
