"""The agent client against a home that lies, and the rules of sending an update.

A hostile aggregator is exactly what the first tests put under test: `FakeHome`
serves tampered models over a real gRPC server, and the client must refuse each
one with an IntegrityError before anything reaches a trainer. The rest covers
SubmitUpdate: retries while the home is unavailable, and what each refusal does
to the pending update on disk (`FINAL_REFUSALS` drop it, others keep it).
All in-process on 127.0.0.1:0.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Client, SubmitRefused
from agent.config import AgentConfig
from agent.daemon import AgentDaemon
from agent.state import AgentState
from agent.submit import local_update, settle_pending
from privacy.mechanism import delta_norm
from proto import strata_pb2 as pb
from proto.errors import (
    FINAL_REFUSALS,
    FailedPrecondition,
    IntegrityError,
    InvalidInput,
    Refusal,
    Unavailable,
)
from storage.codec import decode_tensors, encode_tensors
from storage.keys import KeyPair
from storage.manifest import Manifest
from tests.agent_fakes import FakeHome, make_model, serving
from tests.agent_service_contract import wait_until

ATTACKER = KeyPair.generate()


@pytest.fixture
def home() -> Iterator[FakeHome]:
    with serving(FakeHome()) as (served,):
        yield served


def client_for(home: FakeHome, **settings: Any) -> Client:
    options: dict[str, Any] = {
        "agent_id": "edge-1", "watch": False, "join_timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
    }
    return Client(home.address, **{**options, **settings})


# ------------------------------------------------------------------ a home serving tampered models


def _genuine(home: FakeHome) -> Manifest:
    return Manifest.from_bytes(home.manifest_bytes)


def manifest_not_of_announced_cid(home: FakeHome) -> None:
    # a validly signed manifest (the attacker's key, the same weights), served under the announced CID
    home.manifest_bytes = dataclasses.replace(_genuine(home), num_samples=999).signed(ATTACKER).to_bytes()


def weights_not_of_manifest(home: FakeHome) -> None:
    home.weights = encode_tensors({"w": np.full(4, 666.0, np.float32), "b": np.zeros(2, np.float32)})


def signature_does_not_verify(home: FakeHome) -> None:
    # an edited manifest keeping the original signature, announced and served under its own CID
    home.serve(dataclasses.replace(_genuine(home), num_samples=999), home.weights)


def another_model_than_asked(home: FakeHome) -> None:
    # a genuine, self-consistent model, just not the one announced
    other, blob = make_model(round_=7, value=3.0)
    announced = home.announced
    home.serve(other, blob)
    home.announced = announced


TAMPERING: dict[str, tuple[Callable[[FakeHome], None], str, str]] = {
    "manifest": (manifest_not_of_announced_cid, "hash_mismatch", "manifest bytes do not hash to"),
    "weights": (weights_not_of_manifest, "hash_mismatch", "do not hash to"),
    "signature": (signature_does_not_verify, "bad_signature", "does not verify"),
    "model": (another_model_than_asked, "wrong_model", "asked for model"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_model_is_refused_and_never_held(home: FakeHome, case: str) -> None:
    tamper, reason, words = TAMPERING[case]
    tamper(home)
    with client_for(home) as client:
        with pytest.raises(IntegrityError) as info:
            client.wait_for_model(timeout=5)
        assert info.value.reason == reason and words.lower() in str(info.value).lower()
        assert client.model_manifest is None and client.bytes_downloaded == 0
        with pytest.raises(IntegrityError):
            client.fetch_model_bytes(home.announced.model_cid)
        with pytest.raises(FailedPrecondition):  # nothing to train from, so nothing to submit
            client.submit({"w": np.ones(4, np.float32)}, 1)


def test_the_genuine_model_passes_the_same_checks(home: FakeHome) -> None:
    manifest, blob = make_model()
    with client_for(home) as client:
        weights = client.wait_for_model(timeout=5)
        assert client.model_manifest == manifest and client.bytes_downloaded == len(blob)
        assert np.array_equal(weights["w"], np.ones(4, np.float32))
        # the held model is not fetched again; the current base is asked for with if_none_match
        assert client.download(manifest.cid)[0] == manifest and home.calls["GetModel"] == 1
        assert client.download()[0] == manifest and client.bytes_downloaded == len(blob)


class RecordingTrainer:
    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def train(self, weights: dict[str, np.ndarray], round_config: Any) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        self.calls.append(weights)
        return weights, 1, {}


@pytest.mark.parametrize("case", ["manifest", "weights", "signature"])
def test_an_agent_never_trains_on_a_tampered_model(home: FakeHome, tmp_path: Path, case: str) -> None:
    TAMPERING[case][0](home)
    trainer = RecordingTrainer()
    config = AgentConfig(
        seeds=[home.address], state_dir=str(tmp_path / "agent"), join_timeout_s=5, backoff_base_s=0.01, backoff_max_s=0.05
    )
    daemon = AgentDaemon(config, trainer=trainer)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        # the daemon backs off after a failed download: a second GetModel means the first was dealt with
        wait_until(lambda: bool(trainer.calls) or home.calls["GetModel"] >= 2, 5.0, "the agent neither trained nor retried", poll_s=0.01)
    finally:
        daemon.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert trainer.calls == [] and daemon.rounds_done == 0 and home.submitted == []


# ------------------------------------------------------------------ submitting


def test_submit_sends_a_signed_update_naming_its_base(home: FakeHome) -> None:
    base, _ = make_model()
    with client_for(home) as client:
        weights = client.wait_for_model(timeout=5)
        receipt = client.submit({n: a + 1 for n, a in weights.items()}, 12, {"loss": 0.5})
    (header, _), = home.submitted
    update = Manifest.from_bytes(header.manifest)
    update.verify_signature()
    assert (update.kind, update.base, update.producer.id, update.num_samples) == ("local", base.cid, "edge-1", 12)
    assert (header.base_cid, header.weights_cid, header.agent_id) == (base.cid, update.weights, "edge-1")
    assert receipt.update_cid == update.cid and not receipt.duplicate


def test_local_dp_asked_for_in_the_round_config_is_applied_before_upload_and_named(home: FakeHome) -> None:
    home.round_config = {"dp_clip": "0.5", "dp_noise_multiplier": "0.0"}
    with client_for(home) as client:
        weights = client.wait_for_model(timeout=5)
        client.submit({n: a + 1 for n, a in weights.items()}, 12)
    ((header, blob),) = home.submitted
    update = Manifest.from_bytes(header.manifest)
    assert update.extra["dp"] == {"mechanism": "gaussian", "clip": 0.5, "noise_multiplier": 0.0}
    sent = decode_tensors(blob)
    assert delta_norm(weights, sent) == pytest.approx(0.5, rel=1e-5)  # the +1 everywhere was clipped on the device


def test_an_update_names_the_round_its_base_was_announced_for_even_after_a_newer_base(home: FakeHome) -> None:
    """A base made in round 4 is the base of round 5; a round-6 base arriving during training changes nothing."""
    home.serve(*make_model(round_=4))
    home.announced.round = 5
    with client_for(home, watch=True) as client:
        weights = client.wait_for_model(timeout=5)
        home.serve(*make_model(round_=5, value=2.0))
        home.announced.round = 6
        home.events.put(pb.ModelEvent(new_base=home.announced))
        wait_until(lambda: client.round == 6, 5.0, "the newer base never reached the client", poll_s=0.01)
        client.submit({n: a + 1 for n, a in weights.items()}, 12)
    (header, _), = home.submitted
    assert header.round == 5 and Manifest.from_bytes(header.manifest).round == 5


def test_submit_retries_while_the_home_is_unavailable_rejoining_each_time(home: FakeHome) -> None:
    home.submit_failures = 2
    with client_for(home) as client:
        client.wait_for_model(timeout=5)
        client.submit({"w": np.ones(4, np.float32), "b": np.zeros(2, np.float32)}, 1)
    assert home.calls["SubmitUpdate"] == 3 and len(home.submitted) == 1
    assert home.calls["Join"] == 1 + 2


def test_submit_gives_up_after_its_attempts_and_keeps_the_update_pending(home: FakeHome, tmp_path: Path) -> None:
    home.submit_failures = 100
    with client_for(home, state_dir=str(tmp_path)) as client:
        client.wait_for_model(timeout=5)
        with pytest.raises(Unavailable):
            client.submit({"w": np.ones(4, np.float32), "b": np.zeros(2, np.float32)}, 1)
    assert home.calls["SubmitUpdate"] == 5
    assert AgentState(tmp_path).progress.pending is not None


def _leave_pending(state_dir: Path) -> AgentState:
    """An update written to disk and never acknowledged, as Client.submit leaves it."""
    state = AgentState(state_dir, agent_id="edge-1")
    base, blob = make_model()
    pending, update = local_update(
        {"w": np.ones(4, np.float32)}, base=base, federation="digits", round=0, agent_id="edge-1", key=state.key, num_samples=3
    )
    state.set_pending(pending, update)
    return state


ALL_REFUSALS = [(str(code), code in FINAL_REFUSALS) for code in Refusal]


@pytest.mark.parametrize(("reason", "final"), ALL_REFUSALS)
def test_a_final_refusal_drops_the_pending_update_any_other_keeps_it(tmp_path: Path, reason: str, final: bool) -> None:
    state = _leave_pending(tmp_path)
    pending = state.progress.pending
    assert pending is not None
    settle_pending(state, pb.SubmitUpdateReply(accepted=False, reason=reason))
    progress = AgentState(tmp_path).progress
    if final:
        assert progress.pending is None and not (tmp_path / pending.weights_file).exists()
        assert progress.last_submitted_base == pending.base_cid and progress.last_update_cid == ""
    else:
        assert progress.pending == pending and (tmp_path / pending.weights_file).exists()


def test_an_acknowledged_update_is_cleared_and_remembered(tmp_path: Path) -> None:
    state = _leave_pending(tmp_path)
    base_cid = state.progress.pending.base_cid
    settle_pending(state, pb.SubmitUpdateReply(accepted=True, update_cid="Qmupdate"))
    progress = AgentState(tmp_path).progress
    assert progress.pending is None and progress.last_update_cid == "Qmupdate" and progress.last_submitted_base == base_cid


@pytest.mark.parametrize(("reason", "kept"), [(Refusal.STALE, False), (Refusal.NORM_BOUND, True)])
def test_resend_pending_after_a_restart_follows_the_refusal_rules(home: FakeHome, tmp_path: Path, reason: str, kept: bool) -> None:
    _leave_pending(tmp_path)
    home.submit_refusal = reason
    with client_for(home, state_dir=str(tmp_path)) as client:
        with pytest.raises(SubmitRefused) as info:
            client.resend_pending()
        assert info.value.reason == reason
        assert client.already_submitted(make_model()[0].cid) == (not kept)
    assert (AgentState(tmp_path).progress.pending is not None) is kept


def test_resend_pending_sends_the_same_bytes_once_acknowledged(home: FakeHome, tmp_path: Path) -> None:
    state = _leave_pending(tmp_path)
    written = state.pending_weights()
    with client_for(home, state_dir=str(tmp_path)) as client:
        receipt = client.resend_pending()
        assert receipt is not None and client.resend_pending() is None
    (header, blob), = home.submitted
    assert blob == written and header.manifest.decode() == state.progress.pending.manifest


def test_a_pending_update_whose_weights_changed_on_disk_is_dropped_unsent(home: FakeHome, tmp_path: Path) -> None:
    state = _leave_pending(tmp_path)
    (tmp_path / state.progress.pending.weights_file).write_bytes(encode_tensors({"w": np.zeros(4, np.float32)}))
    with client_for(home, state_dir=str(tmp_path)) as client:
        assert client.resend_pending() is None
    assert home.calls["SubmitUpdate"] == 0 and AgentState(tmp_path).progress.pending is None


def test_a_partial_update_sends_only_the_trainable_tensors(home: FakeHome) -> None:
    with client_for(home, trainable_tensors=["b"]) as client:
        client.wait_for_model(timeout=5)
        client.submit({"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}, 1)
        with pytest.raises(InvalidInput):
            client.submit({"w": np.ones(4, np.float32)}, 1)
    (header, _), = home.submitted
    assert list(header.tensors) == ["b"] and set(Manifest.from_bytes(header.manifest).tensors) == {"b"}
