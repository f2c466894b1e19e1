"""`strata model put|show|export`, `strata lineage` and `strata verify`, run as real subprocesses.

Every command runs with its own HOME; the store is chosen with --store or STRATA_STORE.
Exit codes: 0 ok, 2 invalid input, 3 not found, 4 integrity failure.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from storage.cid import cid_of
from storage.codec import encode_tensors
from storage.manifest import Manifest
from storage.store import LocalStore
from tests.procs import run_strata

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTEGRITY = 0, 2, 3, 4


@dataclass(frozen=True)
class Stored:
    workdir: Path
    home: Path
    store: Path
    source: Path  # the .safetensors file that was put
    base: str  # its model ID
    child: str  # a model put with --parent base


def strata_ok(*args: str, home: Path, env: dict[str, str] | None = None) -> str:
    result = run_strata(*args, home=home, env=env)
    assert result.returncode == EXIT_OK, f"strata {' '.join(args)} -> {result.returncode}\n{result.stderr}"
    return result.stdout


def assert_one_line_error(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    assert lines[0].startswith("strata: "), lines[0]
    assert "Traceback" not in stderr


def stored_objects(store: Path) -> list[Path]:
    objects = store / "objects"
    return [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    workdir = tmp_path_factory.mktemp("cli-model")
    home, store = workdir / "home", workdir / "store"
    source = workdir / "model.safetensors"
    rng = np.random.default_rng(0)
    # written by the safetensors library itself, metadata and all: put keeps these exact bytes
    save_file(
        {"fc.weight": rng.normal(size=(8, 4)).astype(np.float32), "fc.bias": np.zeros(8, np.float32)},
        str(source),
        metadata={"format": "np"},
    )
    base = strata_ok("model", "put", str(source), "--federation", "demo", "--store", str(store), home=home).strip()
    child_out = strata_ok(
        "model", "put", str(source), "--federation", "demo", "--kind", "fork", "--round", "3",
        "--parent", base, "--store", str(store), "--json", home=home,
    )
    child = json.loads(child_out)["model"]
    return Stored(workdir=workdir, home=home, store=store, source=source, base=base, child=child)


def test_put_prints_the_model_cid_and_keeps_the_exact_bytes(stored: Stored) -> None:
    with LocalStore(stored.store) as store:
        manifest = Manifest.from_bytes(store.get(stored.base))
        assert cid_of(store.get(stored.base)) == stored.base
        weights = store.get(manifest.weights)
    assert weights == stored.source.read_bytes()
    # the weights' ID is the Kubo CID of exactly the file's bytes
    assert manifest.weights == cid_of(stored.source.read_bytes())
    assert manifest.kind == "base" and manifest.federation == "demo"
    manifest.verify_signature()


def test_weights_cid_matches_kubo(stored: Stored) -> None:
    from tests.kubo_embedded import kubo_add_cid

    with LocalStore(stored.store) as store:
        manifest = Manifest.from_bytes(store.get(stored.base))
        manifest_file = stored.workdir / "manifest.json"
        manifest_file.write_bytes(store.get(stored.base))
    repo = stored.workdir / "kubo-repo"
    assert kubo_add_cid(repo, stored.source) == manifest.weights
    assert kubo_add_cid(repo, manifest_file) == stored.base


def test_show_json(stored: Stored) -> None:
    shown = json.loads(strata_ok("model", "show", stored.child, "--json", "--store", str(stored.store), home=stored.home))
    assert shown["model"] == stored.child
    manifest = shown["manifest"]
    assert manifest["kind"] == "fork" and manifest["round"] == 3
    assert manifest["parents"] == [stored.base]
    assert manifest["weights"] == cid_of(stored.source.read_bytes())
    assert manifest["tensors"]["fc.weight"] == {"dtype": "F32", "shape": [8, 4]}
    text = strata_ok("model", "show", stored.child, "--store", str(stored.store), home=stored.home)
    assert stored.child in text


def test_export_safetensors_and_pt(stored: Stored) -> None:
    out_st = stored.workdir / "out.safetensors"
    strata_ok("model", "export", stored.base, "-o", str(out_st), "--store", str(stored.store), home=stored.home)
    assert out_st.read_bytes() == stored.source.read_bytes()

    out_pt = stored.workdir / "out.pt"
    strata_ok("model", "export", stored.base, "-o", str(out_pt), "--store", str(stored.store), home=stored.home)
    loaded = torch.load(out_pt, weights_only=True)
    from safetensors.numpy import load_file

    original = load_file(str(stored.source))
    assert sorted(loaded) == sorted(original)
    for name, array in original.items():
        assert torch.equal(loaded[name], torch.from_numpy(array)), name


def test_put_torch_state_dict(tmp_path: Path) -> None:
    state = {"layer.weight": torch.randn(5, 3), "layer.bias": torch.arange(5, dtype=torch.float32)}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    store_dir = tmp_path / "store"
    out = strata_ok("model", "put", str(path), "--federation", "demo", "--store", str(store_dir), "--json", home=tmp_path)
    put = json.loads(out)
    assert put["weights"] == cid_of(encode_tensors(state))
    with LocalStore(store_dir) as store:
        assert cid_of(store.get(put["weights"])) == put["weights"]
        assert Manifest.from_bytes(store.get(put["model"])).weights == put["weights"]
    # a checkpoint wrapping the state_dict is accepted too, with the same weights
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": state}, wrapped)
    out = strata_ok("model", "put", str(wrapped), "--federation", "demo", "--store", str(store_dir), "--json", home=tmp_path)
    assert json.loads(out)["weights"] == put["weights"]


def test_lineage_formats(stored: Stored) -> None:
    common = ("--store", str(stored.store))
    as_json = json.loads(strata_ok("lineage", stored.child, "--format", "json", *common, home=stored.home))
    assert as_json["root"] == stored.child and as_json["ok"] is True
    assert set(as_json["nodes"]) == {stored.child, stored.base}
    assert as_json["nodes"][stored.child]["parents"] == [stored.base]
    assert json.loads(strata_ok("lineage", stored.child, "--json", *common, home=stored.home)) == as_json

    tree = strata_ok("lineage", stored.child, "--format", "tree", *common, home=stored.home)
    assert stored.child[:12] in tree and stored.base[:12] in tree
    dot = strata_ok("lineage", stored.child, "--format", "dot", *common, home=stored.home)
    assert dot.lstrip().startswith("digraph") and stored.base[:12] in dot

    shallow = json.loads(strata_ok("lineage", stored.child, "--json", "--depth", "0", *common, home=stored.home))
    assert set(shallow["nodes"]) == {stored.child}


def test_verify_ok_then_tampered(stored: Stored, tmp_path: Path) -> None:
    result = json.loads(strata_ok("verify", stored.child, "--json", "--store", str(stored.store), home=stored.home))
    assert result["ok"] is True and result["models_checked"] == 2

    store_copy = tmp_path / "store"
    shutil.copytree(stored.store, store_copy)
    with LocalStore(store_copy) as store:
        weights_cid = Manifest.from_bytes(store.get(stored.base)).weights
        victim = store.path_of(weights_cid)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only a re-hash notices
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))

    tampered = run_strata("verify", stored.child, "--store", str(store_copy), home=stored.home)
    assert tampered.returncode == EXIT_INTEGRITY, tampered.stdout + tampered.stderr
    assert weights_cid in tampered.stdout
    # the untouched original still verifies
    assert run_strata("verify", stored.child, "--store", str(stored.store), home=stored.home).returncode == EXIT_OK


def test_tampered_manifest_fails_verify(stored: Stored, tmp_path: Path) -> None:
    store_copy = tmp_path / "store"
    shutil.copytree(stored.store, store_copy)
    with LocalStore(store_copy) as store:
        victim = store.path_of(stored.base)
    text = victim.read_bytes().replace(b'"round":0', b'"round":9')
    assert text != victim.read_bytes()
    os.chmod(victim, 0o644)
    victim.write_bytes(text)
    tampered = run_strata("verify", stored.child, "--json", "--store", str(store_copy), home=stored.home)
    assert tampered.returncode == EXIT_INTEGRITY, tampered.stdout + tampered.stderr
    assert json.loads(tampered.stdout)["ok"] is False


@pytest.mark.parametrize(
    "command",
    [("model", "show"), ("model", "export", "-o", "x.safetensors"), ("lineage",), ("verify",)],
    ids=["show", "export", "lineage", "verify"],
)
def test_unknown_cid_is_not_found(stored: Stored, command: tuple[str, ...]) -> None:
    unknown = cid_of(b"no such model")
    args = [*command[:2], unknown, *command[2:]] if command[0] == "model" else [command[0], unknown]
    result = run_strata(*args, "--store", str(stored.store), home=stored.home)
    assert result.returncode == EXIT_NOT_FOUND, result.stdout + result.stderr
    assert_one_line_error(result.stderr)
    assert unknown in result.stderr


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"weight": _RunsCodeWhenUnpickled(marker)}, handle)
    store_dir = tmp_path / "store"
    result = run_strata("model", "put", str(evil), "--federation", "demo", "--store", str(store_dir), home=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert_one_line_error(result.stderr)
    assert not marker.exists(), "model put executed code from a pickle"
    assert stored_objects(store_dir) == []

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    result = run_strata("model", "put", str(plain), "--federation", "demo", "--store", str(store_dir), home=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr)
    assert stored_objects(store_dir) == []


def test_garbage_safetensors_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    store_dir = tmp_path / "store"
    result = run_strata("model", "put", str(bad), "--federation", "demo", "--store", str(store_dir), home=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert_one_line_error(result.stderr)
    assert stored_objects(store_dir) == []


def test_store_option_and_environment(stored: Stored, tmp_path: Path) -> None:
    env_store, other_store = tmp_path / "env-store", tmp_path / "other-store"
    home = tmp_path / "home"
    model = strata_ok(
        "model", "put", str(stored.source), "--federation", "demo", home=home, env={"STRATA_STORE": str(env_store)}
    ).strip()
    assert stored_objects(env_store), "STRATA_STORE was not used"
    assert not (home / ".strata" / "store").exists(), "the default store was used despite STRATA_STORE"

    strata_ok("model", "show", model, "--store", str(env_store), home=home)
    strata_ok("model", "show", model, home=home, env={"STRATA_STORE": str(env_store)})
    # --store wins over STRATA_STORE
    strata_ok("model", "show", model, "--store", str(env_store), home=home, env={"STRATA_STORE": str(other_store)})
    missing = run_strata("model", "show", model, home=home, env={"STRATA_STORE": str(other_store)})
    assert missing.returncode == EXIT_NOT_FOUND
    missing = run_strata("model", "show", model, "--store", str(other_store), home=home, env={"STRATA_STORE": str(env_store)})
    assert missing.returncode == EXIT_NOT_FOUND

    # with neither, the store is ~/.strata/store under HOME
    default_home = tmp_path / "default-home"
    (default_home / ".strata").mkdir(parents=True)
    shutil.copytree(env_store, default_home / ".strata" / "store")
    strata_ok("model", "show", model, home=default_home)
