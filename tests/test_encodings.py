"""Known-answer tests of the update encodings (storage/encodings.py): error bounds, top-k, error feedback, refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from storage.codec import decode_tensors, encode_tensors
from storage.encodings import FLOAT32, EncodingError, decode_update, encode_update, parse_encoding


def _model(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {
        "w": rng.normal(size=(64, 32)).astype(np.float32),
        "b": rng.normal(size=(32,)).astype(np.float32),
        "steps": np.array([7], dtype=np.int64),  # a counter: travels as it is
    }
    trained = {
        "w": base["w"] + rng.normal(scale=0.01, size=(64, 32)).astype(np.float32),
        "b": base["b"] + rng.normal(scale=0.01, size=(32,)).astype(np.float32),
        "steps": np.array([9], dtype=np.int64),
    }
    return base, trained


def _round_trip(text: str, base, trained, residual=None):
    encoding = parse_encoding(text)
    blob, new_residual = encode_update(trained, base, encoding, residual=residual)
    return blob, decode_update(blob, base, encoding, expected=sorted(trained)), new_residual


def test_parse_encoding_names() -> None:
    assert parse_encoding("") == FLOAT32
    assert parse_encoding("INT8").name == "int8"
    assert parse_encoding("topk:0.010").name == "topk:0.01"
    for bad in ("int4", "topk", "topk:0", "topk:1.5", "topk:nan", "topk:x", "fp16:2"):
        with pytest.raises(EncodingError) as info:
            parse_encoding(bad)
        assert info.value.reason == "bad_encoding"


def test_float32_is_the_plain_safetensors_bytes() -> None:
    base, trained = _model()
    blob, decoded, _ = _round_trip("float32", base, trained)
    assert blob == encode_tensors(trained)
    assert all(np.array_equal(decoded[n], trained[n]) for n in trained)


@pytest.mark.parametrize(
    ("text", "relative_bound"),
    [("fp16", 2.0**-11), ("bf16", 2.0**-8)],  # half an ulp of the delta, relative
)
def test_half_precision_error_is_within_half_an_ulp_of_the_delta(text: str, relative_bound: float) -> None:
    base, trained = _model()
    blob, decoded, _ = _round_trip(text, base, trained)
    assert len(blob) < len(encode_tensors(trained)) * 0.6
    for name in ("w", "b"):
        delta = trained[name].astype(np.float64) - base[name]
        error = np.abs((decoded[name].astype(np.float64) - base[name]) - delta)
        # plus the float32 rounding of the delta and of the sum back onto the base (an ulp of the weights
        # each), and half float16's subnormal step for tiny changes
        assert np.all(error <= np.abs(delta) * relative_bound + np.abs(trained[name]) * 2.0**-22 + 2.0**-25)
        assert decoded[name].dtype == np.float32
    assert np.array_equal(decoded["steps"], trained["steps"])


def test_int8_error_is_at_most_half_a_step() -> None:
    base, trained = _model()
    blob, decoded, _ = _round_trip("int8", base, trained)
    assert len(blob) < len(encode_tensors(trained)) * 0.35
    parts = decode_tensors(blob)
    for name in ("w", "b"):
        delta = trained[name].astype(np.float64) - base[name]
        scale = float(np.abs(delta).max()) / 127
        assert parts[f"{name}/scale"] == pytest.approx(scale, rel=1e-6)
        assert parts[f"{name}/q"].dtype == np.int8 and np.abs(parts[f"{name}/q"]).max() == 127
        error = np.abs((decoded[name].astype(np.float64) - base[name]) - delta)
        assert error.max() <= scale / 2 + np.abs(trained[name]).max() * 2.0**-22


def test_int8_of_an_unchanged_tensor_is_zero_scale() -> None:
    base, _ = _model()
    blob, decoded, _ = _round_trip("int8", base, base)
    assert float(decode_tensors(blob)["w/scale"]) == 0.0
    assert np.array_equal(decoded["w"], base["w"])


def test_topk_keeps_exactly_the_largest_entries() -> None:
    base = {"w": np.zeros(10, np.float32)}
    trained = {"w": np.array([0.1, -5, 0.2, 3, 0, -0.3, 4, 0, 0, 1], np.float32)}
    blob, decoded, residual = _round_trip("topk:0.3", base, trained)
    parts = decode_tensors(blob)
    assert parts["w/idx"].tolist() == [1, 3, 6] and parts["w/idx"].dtype == np.int32
    assert parts["w/val"].tolist() == [-5, 3, 4]
    assert decoded["w"].tolist() == [0, -5, 0, 3, 0, 0, 4, 0, 0, 0]
    assert np.allclose(residual["w"], trained["w"] - decoded["w"])


def test_error_feedback_sums_to_the_true_total_over_rounds() -> None:
    """With the same delta every round, what arrives sums to rounds x delta minus a bounded residual."""
    rng = np.random.default_rng(3)
    base = {"w": np.zeros(1000, np.float32)}
    delta = rng.normal(size=1000).astype(np.float32)
    encoding = parse_encoding("topk:0.05")
    received = np.zeros(1000, np.float32)
    residual: dict[str, np.ndarray] = {}
    errors = []
    for round_ in range(1, 121):
        blob, residual = encode_update({"w": delta}, base, encoding, residual=residual)
        received += decode_update(blob, base, encoding, expected=["w"])["w"]
        # the residual is exactly what has not arrived yet
        assert np.allclose(received + residual["w"], round_ * delta, atol=1e-3)
        errors.append(np.linalg.norm(received / round_ - delta) / np.linalg.norm(delta))
    # without feedback the average would stay at the top-5% share (~0.8 relative error) forever; with it
    # the error is residual / rounds, and the residual stays bounded
    assert errors[0] > 0.7
    assert errors[-1] < 0.1


def test_topk_of_everything_is_lossless() -> None:
    base, trained = _model()
    _, decoded, residual = _round_trip("topk:1", base, trained)
    assert all(np.allclose(decoded[n], trained[n]) for n in ("w", "b"))
    assert not np.any(residual["w"])


def test_a_residual_of_another_shape_is_ignored() -> None:
    base, trained = _model()
    _, decoded, _ = _round_trip("topk:1", base, trained, residual={"w": np.ones(3, np.float32)})
    assert np.allclose(decoded["w"], trained["w"])


def test_fp16_refuses_a_change_out_of_range() -> None:
    base = {"w": np.zeros(2, np.float32)}
    with pytest.raises(EncodingError, match="float16"):
        encode_update({"w": np.array([0, 1e6], np.float32)}, base, parse_encoding("fp16"))


# ------------------------------------------------------------------ malformed blobs


def _refused(blob: bytes, text: str, base, expected=("w",)) -> str:
    with pytest.raises(EncodingError) as info:
        decode_update(blob, base, parse_encoding(text), expected=list(expected))
    assert info.value.reason == "bad_encoding"
    return str(info.value)


BASE = {"w": np.zeros((4, 5), np.float32)}


def test_refuses_float32_bytes_sent_as_int8() -> None:
    assert "names differ" in _refused(encode_tensors({"w": np.ones((4, 5), np.float32)}), "int8", BASE)


def test_refuses_wrong_dtypes_and_shapes() -> None:
    assert "expected F16" in _refused(encode_tensors({"w": np.ones((4, 5), np.float32)}), "fp16", BASE)
    assert "expected F16[4, 5]" in _refused(encode_tensors({"w": np.ones((5, 4), np.float16)}), "fp16", BASE)
    bad_scale = {"w/q": np.zeros((4, 5), np.int8), "w/scale": np.ones(1, np.float32)}
    assert "w/scale" in _refused(encode_tensors(bad_scale), "int8", BASE)


def test_refuses_topk_with_the_wrong_count() -> None:
    blob = encode_tensors({"w/idx": np.arange(5, dtype=np.int32), "w/val": np.ones(5, np.float32)})
    assert "expected I32[2]" in _refused(blob, "topk:0.1", BASE)


@pytest.mark.parametrize("indices", [[3, 20], [-1, 4], [4, 4], [7, 2]])
def test_refuses_topk_indices_out_of_range_or_order(indices: list[int]) -> None:
    blob = encode_tensors({"w/idx": np.array(indices, np.int32), "w/val": np.ones(2, np.float32)})
    assert "strictly increasing" in _refused(blob, "topk:0.1", BASE)


def test_refuses_int8_minus_128_and_bad_scales() -> None:
    q = np.zeros((4, 5), np.int8)
    q[0, 0] = -128
    assert "-128" in _refused(encode_tensors({"w/q": q, "w/scale": np.array(1, np.float32)}), "int8", BASE)
    for scale in (np.nan, np.inf, -1.0):
        blob = encode_tensors({"w/q": np.zeros((4, 5), np.int8), "w/scale": np.array(scale, np.float32)})
        assert "scale" in _refused(blob, "int8", BASE)


def test_refuses_tensors_not_in_the_base() -> None:
    assert "not in the base" in _refused(b"", "int8", BASE, expected=("x",))


def test_garbage_is_a_codec_error_not_a_crash() -> None:
    from storage.codec import CodecError

    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 5], "data_offsets": [0, 99]}}).encode()
    for blob in (b"", b"\x80\x04garbage", struct.pack("<Q", len(header)) + header + b"\0" * 40):
        with pytest.raises(CodecError):
            decode_update(blob, BASE, parse_encoding("fp16"), expected=["w"])


def test_the_agent_owes_a_residual_only_once_its_update_is_acknowledged(tmp_path) -> None:  # noqa: ANN001
    from agent.state import AgentState, PendingUpdate

    state = AgentState(tmp_path, agent_id="a0")

    def pending() -> PendingUpdate:
        return PendingUpdate(
            round=0, base_cid="b", num_samples=1, metrics={}, base_metrics={}, tensors=[], manifest="{}",
            weights_file="pending.safetensors",
        )  # fmt: skip

    state.set_pending(pending(), b"blob")
    state.set_next_residual({"w": np.ones(3, np.float32)})
    assert state.residual() == {}  # not yet: the update may never arrive
    state.clear_pending(update_cid="")  # finally refused: what it carried is gone, the old residual stays
    assert state.residual() == {} and not (tmp_path / "topk_residual.next.safetensors").exists()
    state.set_pending(pending(), b"blob")
    state.set_next_residual({"w": np.full(3, 2, np.float32)})
    AgentState(tmp_path, agent_id="a0")  # a restart in between changes nothing
    state.clear_pending(update_cid="QmAcknowledged")
    assert state.residual()["w"].tolist() == [2, 2, 2]
    assert AgentState(tmp_path, agent_id="a0").residual()["w"].tolist() == [2, 2, 2]
