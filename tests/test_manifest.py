"""Manifests, keys and whole models: canonical bytes, signatures, tampering, field-named errors."""

from __future__ import annotations

import dataclasses
import json
import math
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proto.errors import IntegrityError, InvalidInput
from storage.cid import cid_of
from storage.codec import CodecError, TensorInfo, encode_tensors
from storage.keys import KeyPair, verify_signature
from storage.manifest import SCHEMA, Manifest, ManifestError, Producer, canonical_json, now_rfc3339
from storage.models import load_manifest, load_model, save_model
from storage.store import LocalStore

WEIGHTS = encode_tensors({"dense.bias": np.zeros(3, np.float32), "dense.kernel": np.ones((4, 3), np.float32)})  # fmt: skip
PARENT = cid_of(b"a parent manifest")


def _manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "kind": "cluster",
        "federation": "digits",
        "round": 3,
        "producer": Producer(role="aggregator", id="agg-é"),  # non-ASCII on purpose
        "weights": cid_of(WEIGHTS),
        "tensors": {
            "dense.bias": TensorInfo("F32", (3,)),
            "dense.kernel": TensorInfo("F32", (4, 3)),
        },
        "parents": (PARENT,),
        "base": PARENT,
        "num_samples": 120,
        "metrics": {"loss": 0.25, "accuracy": 1},
        "algorithm": {"name": "fedavg", "params": {"lr": 0.1}},
        "extra": {"refused": [{"peer": "agg-2", "reason": "stale"}]},
        "created_at": "2026-11-24T01:02:03.456Z",
    }
    fields.update(overrides)
    return Manifest(**fields)


# ------------------------------------------------------------------ canonical bytes


def test_bytes_are_canonical_json() -> None:
    manifest = _manifest()
    data = manifest.to_bytes()
    parsed = json.loads(data)
    assert (
        data
        == json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert "agg-é".encode() in data and b"\\u" not in data
    assert parsed["schema"] == SCHEMA and parsed["signature"] is None
    assert parsed["metrics"] == {"accuracy": 1.0, "loss": 0.25}
    assert manifest.cid == cid_of(data)


def test_round_trip_through_bytes_keeps_fields_and_cid() -> None:
    manifest = _manifest()
    back = Manifest.from_bytes(manifest.to_bytes())
    assert back == manifest and back.cid == manifest.cid and back.to_bytes() == manifest.to_bytes()


def test_equal_content_gives_equal_cid_and_any_change_a_new_one() -> None:
    assert _manifest().cid == _manifest().cid
    assert _manifest(round=4).cid != _manifest().cid
    assert _manifest(metrics={"loss": 0.25000000000000006, "accuracy": 1}).cid != _manifest().cid


def test_non_canonical_bytes_are_accepted_and_identified_by_their_own_hash(
    keypair: KeyPair,
) -> None:
    signed = _manifest().signed(keypair)
    pretty = json.dumps(json.loads(signed.to_bytes()), indent=2).encode()
    parsed = Manifest.from_bytes(pretty)
    assert parsed.cid == cid_of(pretty) != signed.cid
    assert parsed.to_bytes() == pretty and parsed.canonical_bytes() == signed.to_bytes()
    parsed.verify_signature()  # the signature covers content, not layout


def test_now_rfc3339_is_accepted() -> None:
    stamp = now_rfc3339()
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-24T01:02:03.456Z")
    assert _manifest(created_at=stamp).created_at == stamp
    assert _manifest(created_at="2026-11-24T01:02:03Z").created_at.endswith("03Z")


# ------------------------------------------------------------------ signatures


def test_signed_manifest_verifies(keypair: KeyPair) -> None:
    manifest = _manifest()
    signed = manifest.signed(keypair)
    assert manifest.signature is None  # signed() returns a copy
    assert signed.signature["public_key"] == keypair.public_key
    signed.verify_signature()
    Manifest.from_bytes(signed.to_bytes()).verify_signature()
    assert json.loads(signed.signing_bytes()) == json.loads(manifest.signing_bytes())
    assert "signature" not in json.loads(signed.signing_bytes())


def test_unsigned_manifest_is_reported() -> None:
    with pytest.raises(IntegrityError) as caught:
        _manifest().verify_signature()
    assert caught.value.reason == "unsigned"


def test_altered_fields_break_the_signature(keypair: KeyPair) -> None:
    signed = _manifest().signed(keypair)
    for change in ({"round": 4}, {"num_samples": 121}, {"parents": ()}, {"metrics": {"loss": 0.1}}):
        forged = dataclasses.replace(signed, **change)
        with pytest.raises(IntegrityError) as caught:
            forged.verify_signature()
        assert caught.value.reason == "bad_signature"


def test_another_key_cannot_claim_a_signature(keypair: KeyPair) -> None:
    signed = _manifest().signed(keypair)
    impostor = KeyPair.generate()
    swapped = dataclasses.replace(
        signed, signature={**signed.signature, "public_key": impostor.public_key}
    )
    with pytest.raises(IntegrityError, match="bad signature"):
        swapped.verify_signature()
    for junk in ("", "not base64!", "QUJD"):
        with pytest.raises(IntegrityError) as caught:
            dataclasses.replace(
                signed, signature={**signed.signature, "sig": junk or "x"}
            ).verify_signature()
        assert caught.value.reason == "bad_signature"


def test_flipping_any_bit_of_stored_bytes_is_caught(keypair: KeyPair) -> None:
    """Every single-bit change to a signed manifest changes its CID, and none still verifies."""
    original = _manifest().signed(keypair).to_bytes()
    for position in range(len(original)):
        for bit in (0x01, 0x20):
            tampered = bytearray(original)
            tampered[position] ^= bit
            tampered = bytes(tampered)
            assert cid_of(tampered) != cid_of(original)
            try:
                manifest = Manifest.from_bytes(tampered)
            except ManifestError:
                continue
            with pytest.raises(IntegrityError):
                manifest.verify_signature()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("kind", "global", "expected one of base, local, relay, cluster, semi-global, fork, proposal, merge, control; got 'global'"),
        ("federation", "", "expected 1-128 characters"),
        ("federation", "a/b", "got 'a/b'"),
        ("producer", "agg", "'producer': expected a Producer"),
        ("round", -1, "non-negative integer"),
        ("round", 1.5, "non-negative integer"),
        ("round", True, "non-negative integer"),
        ("num_samples", -3, "non-negative integer"),
        ("weights", "not-a-cid", "expected a CID"),
        ("parents", ("x",), "expected a CID"),
        ("parents", (PARENT, PARENT), "more than once"),
        ("parents", PARENT, "list of CIDs"),
        ("parents", None, "'parents': expected a list of CIDs"),
        ("base", "x", "CID or null"),
        ("metrics", {"loss": math.nan}, "finite"),
        ("metrics", {"loss": math.inf}, "finite"),
        ("metrics", {"acc": "high"}, "finite"),
        ("metrics", {"acc": True}, "finite"),
        ("metrics", [1.0], "'metrics': expected an object mapping names to numbers"),
        ("metrics", {"": 1.0}, "'metrics': metric names must be non-empty strings"),
        ("algorithm", {"params": {}}, "naming the algorithm"),
        ("extra", {"x": math.inf}, "NaN and infinities"),
        ("extra", {"x": [1.0, math.inf]}, "'extra.x[1]': NaN and infinities"),
        ("extra", {"x": object()}, "'extra.x': object is not a JSON value"),
        ("extra", {1: "one"}, "'extra': object keys must be strings, got 1"),
        ("extra", ["x"], "'extra': expected a JSON object"),
        ("created_at", "yesterday", "RFC 3339"),
        ("created_at", "2026-13-45T01:02:03Z", "RFC 3339"),
        ("created_at", "2026-11-24T01:02:03+01:00", "RFC 3339"),
        ("created_at", "2026-11-24 01:02:03.456Z", "RFC 3339"),
        ("created_at", 0, "RFC 3339"),
        ("schema", "strata/model/2", "strata/model/1"),
        ("signature", {"alg": "rsa", "public_key": "a", "sig": "b"}, "ed25519"),
        ("signature", {"alg": "ed25519"}, "'signature': expected an object with keys 'alg', 'public_key', 'sig'"),
        ("signature", {"alg": "ed25519", "public_key": "", "sig": "b"}, "'signature.public_key': expected a base64 string"),
        ("tensors", {"w": {"dtype": "F32", "shape": [1]}}, "TensorInfo"),
        ("tensors", ["w"], "'tensors': expected an object mapping tensor names"),
        ("tensors", {"": TensorInfo("F32", (1,))}, "'tensors': tensor names must be non-empty strings"),
        ("tensors", {"w": TensorInfo("Q8", (1,))}, "'tensors.w': unknown dtype 'Q8'"),
    ],
)
def test_constructor_names_the_bad_field(field: str, value: Any, needle: str) -> None:
    with pytest.raises(ManifestError) as caught:
        _manifest(**{field: value})
    message = str(caught.value)
    assert caught.value.reason == "invalid_manifest"
    assert f"manifest field '{field}" in message and needle in message, message


def _json_with(**changes: Any) -> bytes:
    record = json.loads(_manifest().to_bytes())
    for name, value in changes.items():
        if value is ...:
            del record[name]
        else:
            record[name] = value
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_json_with(round=-1), "manifest field 'round': expected a non-negative integer"),
        (_json_with(round="3"), "manifest field 'round'"),
        (_json_with(weights=...), "manifest field 'weights': missing"),
        (_json_with(created_at=...), "manifest field 'created_at': missing"),
        (_json_with(surprise=1), "manifest field 'surprise': unknown field"),
        (_json_with(producer="agg"), "manifest field 'producer': expected an object with keys 'role' and 'id'"),
        (_json_with(producer={"role": "agent", "id": ""}), "manifest field 'producer.id'"),
        (_json_with(tensors={"w": {"dtype": "Q8", "shape": [1]}}), "manifest field 'tensors.w': unknown dtype 'Q8'"),
        (_json_with(tensors=["w"]), "manifest field 'tensors': expected an object mapping tensor names"),
        (_json_with(parents="Qm"), "manifest field 'parents': expected a list of CIDs"),
        (_json_with(metrics=[1]), "manifest field 'metrics'"),
        (b"[]", "expected a JSON object"),
        (b"{", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b'{"kind":"local","kind":"base"}', "duplicate key"),
    ],
)
def test_from_bytes_names_the_bad_field(data: bytes, needle: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_bytes(data)
    assert caught.value.reason == "invalid_manifest"
    assert needle in str(caught.value), str(caught.value)


def test_manifests_are_hashable_by_cid() -> None:
    assert len({_manifest(), _manifest(), _manifest(round=9)}) == 2


def test_a_manifest_without_parents_has_none() -> None:
    assert Manifest.from_bytes(_json_with(parents=...)).parents == ()


def test_producer_fields_are_at_most_256_characters() -> None:
    assert Producer(role="agent", id="x" * 256).id == "x" * 256
    with pytest.raises(ManifestError, match="'producer.id': expected a non-empty string of at most 256 chars"):
        Producer(role="agent", id="x" * 257)


def test_created_at_may_carry_up_to_nanoseconds() -> None:
    assert _manifest(created_at="2026-11-24T01:02:03.123456789Z").created_at == "2026-11-24T01:02:03.123456789Z"


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


def test_extra_and_algorithm_carry_any_json() -> None:
    extra = {"count": 3, "flags": [True, None, "x", 1.5, {"depth": 2}]}
    manifest = _manifest(extra=extra, algorithm={"name": "fedavg", "params": {"k": 2}})
    assert manifest.extra == extra and manifest.algorithm["params"] == {"k": 2}
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_a_manifest_is_normalized_and_shares_nothing_with_its_caller(keypair: KeyPair) -> None:
    tensors = {"dense.bias": TensorInfo("F32", (3,)), "dense.kernel": TensorInfo("F32", (4, 3))}
    metrics, parents, extra = {"accuracy": 1, "loss": 0.25}, [PARENT], {"refused": [{"peer": "agg-2", "reason": "stale"}]}
    manifest = _manifest(tensors=tensors, metrics=metrics, parents=parents, extra=extra)
    # an int metric is a float, a list of parents a tuple: equal content, equal manifest, equal CID
    as_float = _manifest(metrics={"accuracy": 1.0, "loss": 0.25}, parents=(PARENT,))
    assert manifest == as_float and manifest.cid == as_float.cid
    assert manifest.parents == (PARENT,) and manifest.metrics == {"accuracy": 1.0, "loss": 0.25}
    tensors["extra.weight"] = TensorInfo("F32", (1,))
    metrics["loss"] = 9.0
    parents.append(cid_of(b"another parent"))
    extra["refused"].clear()
    assert manifest.to_bytes() == _manifest().to_bytes()

    signed = _manifest().signed(keypair)
    signature = dict(signed.signature)
    copy = dataclasses.replace(signed, signature=signature)
    signature["sig"] = "QUJD"
    copy.verify_signature()


# ------------------------------------------------------------------ keys


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.key"
    pair = KeyPair.generate()
    pair.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text())
    assert record["type"] == "ed25519" and record["public"] == pair.public_key
    loaded = KeyPair.load(path)
    assert loaded.public_key == pair.public_key
    verify_signature(pair.public_key, b"hello", loaded.sign(b"hello"))
    with pytest.raises(IntegrityError) as caught:
        verify_signature(pair.public_key, b"hellO", loaded.sign(b"hello"))
    assert caught.value.reason == "bad_signature"


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    first = KeyPair.load_or_create(path)
    assert KeyPair.load_or_create(path).public_key == first.public_key
    assert [p.name for p in tmp_path.iterdir()] == ["id.key"]


@pytest.mark.parametrize(
    "text",
    ["not json", '{"type": "rsa"}', '{"type": "ed25519", "private": "AAAA", "public": "x"}'],
)
def test_bad_key_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(InvalidInput) as caught:
        KeyPair.load(path)
    assert caught.value.reason == "bad_key"


def test_key_file_with_mismatched_public_half_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    KeyPair.generate().save(path)
    record = json.loads(path.read_text())
    record["public"] = KeyPair.generate().public_key
    path.write_text(json.dumps(record))
    with pytest.raises(InvalidInput, match="does not match"):
        KeyPair.load(path)


# ------------------------------------------------------------------ whole models


def test_save_and_load_model(local_store: LocalStore, keypair: KeyPair) -> None:
    manifest = save_model(
        local_store,
        weights=WEIGHTS,
        kind="local",
        federation="digits",
        round=1,
        producer=Producer(role="agent", id="a-1"),
        key=keypair,
        parents=[PARENT],
        base=PARENT,
        num_samples=64,
        metrics={"loss": 0.5},
    )
    assert manifest.weights == cid_of(WEIGHTS)
    assert manifest.tensors == {
        "dense.bias": TensorInfo("F32", (3,)),
        "dense.kernel": TensorInfo("F32", (4, 3)),
    }
    loaded, weights = load_model(local_store, manifest.cid)
    assert loaded == manifest and weights == WEIGHTS
    assert load_manifest(local_store, manifest.cid).cid == manifest.cid
    loaded.verify_signature()
    assert canonical_json(json.loads(local_store.get(manifest.cid))) == local_store.get(
        manifest.cid
    )


def test_save_model_refuses_bad_weights_before_storing(local_store: LocalStore) -> None:
    with pytest.raises(CodecError):
        save_model(
            local_store, weights=b"\x80\x04garbage", kind="local", federation="digits", round=0,
            producer=Producer(role="agent", id="a"), key=None,
        )  # fmt: skip
    assert list(local_store) == []


def test_tampered_weights_or_manifest_on_disk_are_refused(
    local_store: LocalStore, keypair: KeyPair
) -> None:
    manifest = save_model(
        local_store, weights=WEIGHTS, kind="base", federation="digits", round=0,
        producer=Producer(role="operator", id="op"), key=keypair,
    )  # fmt: skip
    weights_path = local_store.path_of(manifest.weights)
    original = weights_path.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x40  # one bit of one float
    weights_path.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError) as caught:
        load_model(local_store, manifest.cid)
    assert caught.value.reason == "hash_mismatch"
    weights_path.write_bytes(original)
    load_model(local_store, manifest.cid)

    manifest_path = local_store.path_of(manifest.cid)
    manifest_path.write_bytes(manifest_path.read_bytes().replace(b'"round":0', b'"round":9'))
    with pytest.raises(IntegrityError) as caught:
        load_manifest(local_store, manifest.cid)
    assert caught.value.reason == "hash_mismatch"


def test_load_model_checks_weights_against_the_manifest(local_store: LocalStore) -> None:
    other = encode_tensors({"dense.bias": np.zeros(5, np.float32)})
    liar = _manifest(weights=local_store.put(other))  # lists tensors `other` does not hold
    local_store.put(liar.to_bytes())
    with pytest.raises(IntegrityError) as caught:
        load_model(local_store, liar.cid)
    assert caught.value.reason == "weights_mismatch"


# ------------------------------------------------------------------ embedded certificates

# storage checks only that it is one PEM certificate; trust.signers reads it (tests/test_signers.py)
CERT = "-----BEGIN CERTIFICATE-----\nTUlJQmVnaW4=\nZmFrZQ==\n-----END CERTIFICATE-----\n"


def test_a_manifest_without_a_certificate_has_no_certificate_key_so_old_bytes_and_cids_stay(keypair: KeyPair) -> None:
    manifest = _manifest().signed(keypair)
    assert manifest.certificate is None
    assert b"certificate" not in manifest.to_bytes()
    record = json.loads(manifest.to_bytes())
    # an old manifest (written before the field existed) parses to the same bytes and CID
    again = Manifest.from_json(record)
    assert again.to_bytes() == manifest.to_bytes() and again.cid == manifest.cid


def test_a_certified_key_embeds_its_certificate_under_the_signature(keypair: KeyPair) -> None:
    certified = keypair.with_certificate(CERT)
    assert certified.public_key == keypair.public_key and certified.certificate == CERT
    manifest = _manifest().signed(certified)
    assert manifest.certificate == CERT
    manifest.verify_signature()
    assert json.loads(manifest.to_bytes())["certificate"] == CERT
    assert b"certificate" in manifest.signing_bytes()
    parsed = Manifest.from_bytes(manifest.to_bytes())
    assert parsed.certificate == CERT and parsed.cid == manifest.cid
    # swapping the certificate breaks the signature: it is covered
    swapped = json.loads(manifest.to_bytes())
    swapped["certificate"] = CERT.replace("ZmFrZQ==", "b3RoZXI=")
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(canonical_json(swapped)).verify_signature()
    # deterministic: the same content signed by the same certified key gives the same CID
    assert _manifest().signed(certified).cid == manifest.cid


def test_a_certificate_source_is_read_at_each_signing(keypair: KeyPair) -> None:
    current = [CERT]
    certified = keypair.with_certificate(lambda: current[0])
    first = _manifest().signed(certified)
    current[0] = CERT.replace("ZmFrZQ==", "cmVuZXc=")  # a renewal: same key, new certificate
    second = _manifest().signed(certified)
    assert first.certificate == CERT and second.certificate == current[0]
    assert "certified" in repr(certified) and "certified" not in repr(keypair)


def test_a_bare_key_keeps_a_certificate_already_in_the_manifest(keypair: KeyPair) -> None:
    manifest = _manifest(certificate=CERT).signed(keypair)
    assert manifest.certificate == CERT
    manifest.verify_signature()


@pytest.mark.parametrize(
    "value", [None, "", "not a pem", 7, CERT + CERT, CERT.replace("BEGIN CERTIFICATE", "BEGIN PRIVATE KEY"), CERT + "x" * 20000]
)
def test_a_certificate_field_that_is_not_one_pem_certificate_is_refused(value: Any) -> None:
    record = json.loads(_manifest().to_bytes())
    record["certificate"] = value
    with pytest.raises(ManifestError, match="certificate"):
        Manifest.from_bytes(canonical_json(record))
    if value is not None:
        with pytest.raises(ManifestError, match="certificate"):
            _manifest(certificate=value)
