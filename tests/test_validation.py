"""An update's checks, one refusal code each: the header, the sender's manifest, the tensors. Pure functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from intake.submission import MAX_NUM_SAMPLES, Submission, check_header, update_manifest
from intake.validation import UpdateLimits, mismatch, non_finite, relative_change, validate_update
from proto.errors import Refusal, UpdateRefused
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, now_rfc3339

W, B = "w", "b"
BASE = {W: np.ones((2, 2), np.float32), B: np.zeros(2, np.float32)}
LIMITS = UpdateLimits(max_update_bytes=1 << 20, max_relative_norm=10.0)
BASE_CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def refused(call) -> UpdateRefused:
    with pytest.raises(UpdateRefused) as info:
        call()
    return info.value


def refusal(call) -> Refusal:
    return refused(call).reason


def blob(**tensors: np.ndarray) -> bytes:
    return encode_tensors(tensors or {W: BASE[W] + 0.1, B: BASE[B] + 0.1})


# ---------------------------------------------------------------- tensors


def test_a_good_update_comes_back_decoded() -> None:
    tensors = validate_update(blob(), base=BASE, declared_tensors=(), limits=LIMITS)
    np.testing.assert_allclose(tensors[W], 1.1)


def test_a_declared_subset_is_a_partial_update() -> None:
    tensors = validate_update(blob(b=np.ones(2, np.float32)), base=BASE, declared_tensors=[B], limits=LIMITS)
    assert list(tensors) == [B]


@pytest.mark.parametrize(
    ("weights", "declared", "reason", "says"),
    [
        (b"\x00" * 16, (), Refusal.INVALID_SAFETENSORS, "not safetensors"),
        (encode_tensors({W: np.ones((2, 2), np.float32)}), (), Refusal.SHAPE_MISMATCH, "missing ['b']"),
        (
            encode_tensors({W: np.ones((3, 2), np.float32), B: np.zeros(2, np.float32)}), (), Refusal.SHAPE_MISMATCH,
            "shape (3, 2) != base (2, 2)",
        ),
        (
            encode_tensors({W: np.ones((2, 2), np.float64), B: np.zeros(2, np.float32)}), (), Refusal.SHAPE_MISMATCH,
            "dtype float64 != base float32",
        ),
        (encode_tensors({B: np.zeros(2, np.float32)}), ("nope",), Refusal.SHAPE_MISMATCH, "not in the base model: ['nope']"),
        # declared and sent, but not a base tensor
        (encode_tensors({"nope": np.zeros(2, np.float32)}), ("nope",), Refusal.SHAPE_MISMATCH, "not in the base model"),
        (
            encode_tensors({W: np.full((2, 2), np.nan, np.float32), B: np.zeros(2, np.float32)}), (), Refusal.NOT_FINITE,
            "'w' contains NaN",
        ),
        (
            encode_tensors({W: np.full((2, 2), np.inf, np.float32), B: np.zeros(2, np.float32)}), (), Refusal.NOT_FINITE,
            "infinite",
        ),
        (
            encode_tensors({W: np.full((2, 2), 1e3, np.float32), B: np.zeros(2, np.float32)}), (), Refusal.NORM_BOUND,
            "over the bound 20",
        ),
    ],
    ids=["garbage", "missing tensor", "shape", "dtype", "undeclared name", "declared unknown name", "nan", "inf", "norm"],
)
def test_each_bad_update_gets_its_own_reason(weights: bytes, declared: tuple, reason: Refusal, says: str) -> None:
    error = refused(lambda: validate_update(weights, base=BASE, declared_tensors=declared, limits=LIMITS))
    assert error.reason == reason
    assert says in error.message  # the sender and the operator are told what was wrong


def test_too_large_is_refused_before_parsing() -> None:
    tiny = UpdateLimits(max_update_bytes=10, max_relative_norm=None)
    error = refused(lambda: validate_update(b"\x00" * 11, base=BASE, declared_tensors=(), limits=tiny))
    assert error.reason == Refusal.TOO_LARGE and "11 bytes" in error.message and "limit is 10" in error.message


def test_an_update_of_exactly_the_size_limit_is_not_too_large() -> None:
    weights = blob()
    at_limit = UpdateLimits(max_update_bytes=len(weights), max_relative_norm=None)
    validate_update(weights, base=BASE, declared_tensors=(), limits=at_limit)
    check_header(submission(weights=weights), at_limit, kinds=("local",))


def test_the_norm_bound_is_relative_to_the_base_and_can_be_disabled() -> None:
    # ||base|| = 2; a change of L2 20 is exactly 10 x 2: allowed, one more is not
    at_bound = {W: BASE[W] + 10.0, B: BASE[B]}
    assert relative_change(BASE, at_bound) == pytest.approx((20.0, 2.0))
    validate_update(encode_tensors(at_bound), base=BASE, declared_tensors=(), limits=LIMITS)
    over = {W: BASE[W] + 10.01, B: BASE[B]}
    assert refusal(lambda: validate_update(encode_tensors(over), base=BASE, declared_tensors=(), limits=LIMITS)) == (
        Refusal.NORM_BOUND
    )
    unbounded = UpdateLimits(max_update_bytes=1 << 20, max_relative_norm=None)
    validate_update(encode_tensors({W: BASE[W] + 1e6, B: BASE[B]}), base=BASE, declared_tensors=(), limits=unbounded)


def test_the_norm_bound_of_a_small_base_is_relative_to_norm_one() -> None:
    """max(||base||, 1): a zero base allows a change of max_relative_norm x 1, not more."""
    zero = {B: np.zeros(4, np.float32)}
    limits = UpdateLimits(max_update_bytes=1 << 20, max_relative_norm=1.0)
    validate_update(encode_tensors({B: np.full(4, 0.5, np.float32)}), base=zero, declared_tensors=(), limits=limits)
    over = encode_tensors({B: np.full(4, 0.75, np.float32)})  # L2 1.5
    assert refusal(lambda: validate_update(over, base=zero, declared_tensors=(), limits=limits)) == Refusal.NORM_BOUND


def test_relative_change_is_the_l2_norm_over_the_floating_tensors() -> None:
    base = {"steps": np.array([1], np.int64), W: np.array([2.0, 2.0, 1.0], np.float32)}
    update = {"steps": np.array([100], np.int64), W: np.array([2.0, 5.0, 5.0], np.float32)}
    # integer tensors (counters) are skipped, wherever they are; ||(0, 3, 4)|| = 5, ||(2, 2, 1)|| = 3
    assert relative_change(base, update) == pytest.approx((5.0, 3.0))


def test_mismatch_is_the_one_compatibility_rule() -> None:
    assert mismatch(BASE, {B: np.zeros(2, np.float32)}) is None  # a subset is a partial update
    assert mismatch(BASE, {B: np.zeros(2, np.float32)}, expected=[W, B]) is not None
    assert mismatch(BASE, {}) == "no tensors"
    assert "not in the base" in mismatch(BASE, {"x": np.zeros(1)})
    assert "shape" in mismatch(BASE, {B: np.zeros(3, np.float32)})
    assert "dtype" in mismatch(BASE, {B: np.zeros(2, np.int32)})
    assert non_finite({W: np.array([1.0, np.nan])}) and non_finite({W: np.array([1, 2])}) is None


def test_mismatch_checks_only_shapes_of_tensors_without_a_numpy_dtype() -> None:
    assert mismatch(BASE, {B: SimpleNamespace(shape=(2,))}) is None
    assert "shape" in mismatch(BASE, {B: SimpleNamespace(shape=(3,))})
    assert mismatch(BASE, {"x": np.zeros(2)}, expected=["x"]) == "declared tensors not in the base model: ['x']"


# ---------------------------------------------------------------- the header


def submission(**fields) -> Submission:
    weights = fields.pop("weights", blob())
    values = dict(agent_id="a1", round=3, base_cid=BASE_CID, num_samples=10, weights=weights, federation="digits")
    values.update(fields)
    return Submission(**values)


def test_a_good_header_gives_the_weights_cid() -> None:
    sub = submission()
    assert check_header(sub, LIMITS, kinds=("local",)) == cid_of(sub.weights)
    assert check_header(submission(received_cid="precomputed"), LIMITS, kinds=("local",)) == "precomputed"


@pytest.mark.parametrize(
    ("fields", "reason", "says"),
    [
        ({"agent_id": ""}, Refusal.BAD_HEADER, "agent_id"),
        ({"base_cid": "not-a-cid"}, Refusal.BAD_HEADER, "'not-a-cid'"),
        ({"num_samples": 0}, Refusal.BAD_HEADER, "got 0"),
        ({"num_samples": -5}, Refusal.BAD_HEADER, "got -5"),
        ({"num_samples": MAX_NUM_SAMPLES + 1}, Refusal.BAD_HEADER, "num_samples"),  # 2^63: would overflow the journal
        ({"kind": "cluster"}, Refusal.BAD_HEADER, "'cluster'"),
        (
            {"weights_cid": "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"}, Refusal.HASH_MISMATCH,
            "header says QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n",
        ),
        ({"weights": b"\x00" * (2 << 20)}, Refusal.TOO_LARGE, "bytes"),
    ],
    ids=["no agent", "base not a cid", "zero samples", "negative samples", "2^63 samples", "kind", "cid", "size"],
)
def test_bad_headers_are_refused(fields: dict, reason: Refusal, says: str) -> None:
    error = refused(lambda: check_header(submission(**fields), LIMITS, kinds=("local",)))
    assert error.reason == reason and says in error.message


def test_one_sample_is_enough() -> None:
    check_header(submission(num_samples=1), LIMITS, kinds=("local",))


def test_the_largest_sample_count_the_journal_holds_passes_the_header() -> None:
    check_header(submission(num_samples=MAX_NUM_SAMPLES), LIMITS, kinds=("local",))


# ---------------------------------------------------------------- the sender's manifest


def signed_manifest(key: KeyPair, sub: Submission, **changes) -> bytes:
    fields = dict(
        kind=sub.kind,
        federation="digits",
        round=sub.round,
        producer=Producer(role="agent", id=sub.agent_id),
        weights=cid_of(sub.weights),
        base=sub.base_cid,
        num_samples=sub.num_samples,
        created_at=now_rfc3339(),
    )
    fields.update(changes)
    fields.setdefault("tensors", summarize(sub.weights))
    return Manifest(**fields).signed(key).to_bytes()


def test_a_sender_manifest_that_matches_the_header_is_kept_as_sent() -> None:
    key, sub = KeyPair.generate(), submission()
    sent = signed_manifest(key, sub)
    manifest = update_manifest(
        submission(manifest=sent), cid_of(sub.weights), federation="digits", recorder="agg", key=KeyPair.generate()
    )
    assert manifest.to_bytes() == sent
    assert manifest.signature["public_key"] == key.public_key


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "relay"},
        {"federation": "mnist"},
        {"round": 4},
        {"weights": "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"},
        {"base": "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"},
        {"num_samples": 11},
        {"producer": Producer(role="agent", id="mallory")},
        {"parents": ("QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n",)},
        {"tensors": summarize(encode_tensors({W: np.ones((20, 20), np.float32), B: np.zeros(2, np.float32)}))},
    ],
    ids=["kind", "federation", "round", "weights", "base", "num_samples", "producer", "parents", "tensors"],
)
def test_a_manifest_that_disagrees_with_the_header_is_refused(changes: dict) -> None:
    sub = submission()
    bad = signed_manifest(KeyPair.generate(), sub, **changes)
    error = refused(
        lambda: update_manifest(
            submission(manifest=bad), cid_of(sub.weights), federation="digits", recorder="agg", key=KeyPair.generate()
        )
    )
    assert error.reason == Refusal.BAD_MANIFEST
    field = "producer.id" if "producer" in changes else next(iter(changes))
    assert error.message.endswith(f"disagrees with the header on {[field]}")


def test_a_tampered_or_unreadable_manifest_is_refused() -> None:
    sub = submission()
    sent = signed_manifest(KeyPair.generate(), sub, metrics={"loss": 0.5})
    # a field the header does not repeat: only the signature can tell it was changed
    tampered = sent.replace(b'"loss":0.5', b'"loss":0.1')
    assert tampered != sent
    for bad, says in ((tampered, "bad signature"), (b"{not json", "not valid UTF-8 JSON"), (b"\xff" * 10, "UTF-8")):
        error = refused(
            lambda bad=bad: update_manifest(
                submission(manifest=bad), cid_of(sub.weights), federation="digits", recorder="agg", key=KeyPair.generate()
            )
        )
        assert error.reason == Refusal.BAD_MANIFEST and error.message.startswith("update manifest: ")
        assert says in error.message


def test_without_a_sender_manifest_the_receiver_records_and_signs_one() -> None:
    key, sub = KeyPair.generate(), submission(metrics={"loss": 0.5})
    manifest = update_manifest(sub, cid_of(sub.weights), federation="digits", recorder="agg-a", key=key, clock=lambda: 0.0)
    assert manifest.extra == {"recorded_by": "agg-a"}
    assert manifest.producer == Producer(role="agent", id="a1")
    assert (manifest.base, manifest.round, manifest.num_samples, manifest.metrics) == (BASE_CID, 3, 10, {"loss": 0.5})
    assert manifest.created_at == "1970-01-01T00:00:00.000Z"
    assert manifest.signature["public_key"] == key.public_key
    manifest.verify_signature()


def test_a_relays_update_without_a_manifest_is_recorded_as_the_relays_with_its_parents() -> None:
    parents = (cid_of(b"device update 1"), cid_of(b"device update 2"))
    sub = submission(agent_id="relay-1", kind="relay", parents=parents)
    manifest = update_manifest(sub, cid_of(sub.weights), federation="digits", recorder="agg-a", key=KeyPair.generate())
    assert manifest.producer == Producer(role="relay", id="relay-1")
    assert (manifest.kind, manifest.parents) == ("relay", parents)
