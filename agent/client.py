"""The client library: what an agent (or your own training loop) uses to talk to its home aggregator.

    with Client(["127.0.0.1:7070"], federation="digits") as client:
        weights = client.wait_for_model()
        client.submit(weights, num_samples, {"loss": 0.3})

`Client` is the facade; each concern lives in its own module:
`agent.session` (joining, redirects, the home, re-joining),
`agent.transfer` (GetModel and the checks on every model served),
`agent.submit` (the signed update, the pending update on disk, SubmitUpdate) and
`agent.loops` (the watch and heartbeat threads). Every retry goes through one
`proto.retry.RetryPolicy` built from `backoff_base_s` and `backoff_max_s`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from agent.algorithms import SCAFFOLD_LR, SCAFFOLD_STEPS, variate_update
from agent.loops import BackgroundLoops
from agent.privacy import apply_local_dp
from agent.session import Identity, ModelInfo, Session
from agent.state import AgentState
from agent.submit import SubmitReceipt, SubmitRefused, Submitter, encode_weights, local_update
from agent.transfer import ModelTransfer
from proto import strata_pb2 as pb
from proto.convert import CAPABILITIES
from proto.errors import FailedPrecondition, IntegrityError, InvalidInput
from proto.retry import RetryPolicy
from proto.wire import DEFAULT_TIMEOUT_S, create_channel, error_from_rpc
from storage.codec import CodecError, decode_tensors, encode_tensors
from storage.control import CONTROL_KIND, scaffold_enabled, server_control_cid
from storage.encodings import Encoding, federation_encoding
from storage.keys import KeyPair
from storage.manifest import Manifest
from trust.messages import revocations_from_reply
from trust.revocation import RevocationList

__all__ = ["Client", "ModelInfo", "SubmitReceipt", "SubmitRefused"]


class Client:
    def __init__(
        self,
        seeds: str | Sequence[str],
        *,
        federation: str = "digits",
        agent_id: str = "",
        display_name: str = "",
        capability: str = "train",
        trainable_tensors: Sequence[str] | None = None,
        state_dir: str | None = None,
        rpc_timeout_s: float = DEFAULT_TIMEOUT_S,
        join_timeout_s: float = 300.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        watch: bool = True,
        start_jitter_s: float = 0.0,
        key: KeyPair | None = None,
        channel_factory: Callable[[str], grpc.Channel] = create_channel,
    ) -> None:
        self.seeds = [seeds] if isinstance(seeds, str) else list(seeds)
        if not self.seeds:
            raise InvalidInput("at least one aggregator address is needed", reason="bad_config")
        if capability not in CAPABILITIES:
            raise InvalidInput(f"capability must be one of {sorted(CAPABILITIES)}", reason="bad_config")
        self.federation = federation
        self.capability = capability
        self.display_name = display_name
        self.trainable_tensors = list(trainable_tensors) if trainable_tensors else None
        self._state = AgentState(state_dir, agent_id=agent_id) if state_dir else None
        self.agent_id = self._state.agent_id if self._state else (agent_id or f"agent-{random.getrandbits(32):08x}")
        # the manifest-signing key: given (a certified one, with TLS), kept in state_dir, or made up
        self._key = key or (self._state.key if self._state else KeyPair.generate())
        self._start_jitter_s = start_jitter_s
        self._joined_once = False
        retry = RetryPolicy(base_s=backoff_base_s, max_s=backoff_max_s)
        identity = Identity(
            agent_id=self.agent_id,
            federation=federation,
            capability=CAPABILITIES[capability],
            display_name=display_name,
            trainable_tensors=tuple(self.trainable_tensors or ()),
        )
        self._session = Session(
            self.seeds,
            identity,
            channel_factory=channel_factory,
            retry=retry,
            rpc_timeout_s=rpc_timeout_s,
            join_timeout_s=join_timeout_s,
        )
        self._transfer = ModelTransfer(self._session)
        self._submitter = Submitter(self._session, key=self._key, state=self._state, retry=retry)
        self._loops = BackgroundLoops(self._session) if watch else None
        self._returned_cid = self._state.progress.last_base_cid if self._state else ""
        # the round the home announced the returned base for (its manifest says the round that made it)
        self._returned_round: int | None = None
        # top-k's error-feedback residual when there is no state directory to keep it in
        self._residual: dict[str, np.ndarray] = {}
        # SCAFFOLD's client variate c_i when there is no state directory to keep it in
        self._variate: dict[str, np.ndarray] = {}
        # the last server variate c fetched: (its model CID, its tensors)
        self._server_variate: tuple[str, dict[str, np.ndarray]] = ("", {})

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> Client:
        """Join (after a random wait of up to `start_jitter_s`, so a fleet started together does not
        arrive together), then start the watch and heartbeat threads (unless built with watch=False)."""
        if self._start_jitter_s > 0 and not self._joined_once:
            self._session.closed.wait(random.random() * self._start_jitter_s)
        self._joined_once = True
        self.join()
        if self._loops is not None:
            self._loops.start()
        return self

    def close(self) -> None:
        """Stop the background threads and close every channel; idempotent."""
        if self._session.closed.is_set():
            return
        self._session.close()
        if self._loops is not None:
            self._loops.join()

    @property
    def closed(self) -> bool:
        return self._session.closed.is_set()

    def drop_channels(self) -> None:
        """Dial every aggregator anew from the next call on (after a certificate renewal: new connections
        present the new certificate); calls in flight finish on the channels they started on."""
        self._session.drop_channels()

    # ------------------------------------------------------------------ the home

    def join(self) -> None:
        """Join through any known aggregator, following redirects, with backoff while none answers."""
        self._session.join()

    @property
    def home_id(self) -> str:
        return self._session.home_id

    @property
    def home_address(self) -> str:
        return self._session.home_address

    @property
    def round_config(self) -> dict[str, str]:
        return self._session.round_config

    @property
    def heartbeat_interval_s(self) -> float:
        """How often this client heartbeats: what its home last asked for."""
        return self._session.heartbeat_interval_s

    # ------------------------------------------------------------------ models

    def current(self) -> ModelInfo:
        """The home's current base model: its CID and round."""
        return self._session.current()

    @property
    def round(self) -> int:
        return self.current().round

    @property
    def model_cid(self) -> str:
        return self.current().model_cid

    @property
    def model_manifest(self) -> Manifest | None:
        held = self._transfer.held
        return held[0] if held else None

    @property
    def bytes_downloaded(self) -> int:
        return self._transfer.bytes_downloaded

    def wait_for_model(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Wait for a base model this client has not handed out yet, download it, and return its tensors.

        A training client waits for a base it is invited to train on (a home with selection
        invites a sample of its agents each round); an inference-only client takes every base.
        """
        target = self._session.wait_for_base_other_than(
            self._returned_cid, timeout, invited_only=self.capability != "inference"
        )
        _, tensors = self._transfer.download(target.model_cid)
        self._returned_cid = target.model_cid
        self._returned_round = target.round
        if self._state is not None:
            self._state.progress.last_base_cid = target.model_cid
            self._state.save()
        return tensors

    def download(self, model_cid: str = "") -> tuple[Manifest, dict[str, np.ndarray]]:
        """Fetch a model (default: the current base) unless it is the one already held; verified."""
        return self._transfer.download(model_cid)

    def fetch_model_bytes(self, model_cid: str = "") -> tuple[Manifest, bytes]:
        """A model's verified manifest and raw weight bytes (default: the current base), without
        keeping it as this client's model: for callers that store models themselves (a relay's cache)."""
        return self._transfer.fetch_model_bytes(model_cid)

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        weights: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
        *,
        base_metrics: Mapping[str, float] | None = None,
    ) -> SubmitReceipt:
        """Upload an update trained from the model last returned by `wait_for_model`.

        With `trainable_tensors` set, only those tensors are sent (a partial update).
        Raises SubmitRefused with the aggregator's reason code when it is refused.
        """
        held = self._transfer.held
        if held is None:
            raise FailedPrecondition("no base model downloaded yet: call wait_for_model() first", reason="no_base")
        base = held[0]
        weights, dp = apply_local_dp(held[1], weights, self.round_config, tensors=self.trainable_tensors)
        # from the weights as sent (after local DP): delta_c then tells the home nothing the update does not
        control, variate = self._variate_update(held, weights, metrics or {})
        encoded, residual = self._encode(weights, base_tensors=held[1])
        pending, blob = local_update(
            weights,
            base=base,
            federation=self.federation,
            round=self._base_round(base.cid),
            agent_id=self.agent_id,
            key=self._key,
            num_samples=num_samples,
            metrics=metrics,
            base_metrics=base_metrics,
            tensors=self.trainable_tensors,
            dp=dp,
            encoded=encoded,
            control=control,
        )
        if residual is not None and self._state is not None:
            self._state.set_next_residual(residual)  # owed from when the pending update is acknowledged
        if variate is not None and self._state is not None:
            self._state.set_next_variate(variate)  # c_i from when the home acknowledged the delta_c
        receipt = self._submitter.submit_local(pending, blob, control)
        if residual is not None and self._state is None:
            self._residual = residual  # delivered: what it left out is owed now
        if variate is not None and self._state is None:
            self._variate = variate
        return receipt

    # ------------------------------------------------------------------ SCAFFOLD

    def scaffold_correction(self) -> dict[str, np.ndarray] | None:
        """SCAFFOLD's gradient correction c - c_i over the trained tensors, for training on the base last
        returned by `wait_for_model`; None when the federation does not run SCAFFOLD. The server variate
        c is the `control` model the base's manifest names (fetched by CID from the home; zeros before
        the first round closed); c_i is this agent's, kept in its state directory."""
        if not scaffold_enabled(self.round_config):
            return None
        held = self._transfer.held
        if held is None:
            raise FailedPrecondition("no base model downloaded yet: call wait_for_model() first", reason="no_base")
        server = self._server_control(held[0], held[1])
        client = self._client_variate()
        return {
            name: (server[name] if name in server else np.zeros_like(held[1][name], dtype=np.float32))
            - (client[name] if name in client else np.zeros_like(held[1][name], dtype=np.float32))
            for name in self._trained_names(held[1])
        }

    def _trained_names(self, base_tensors: Mapping[str, np.ndarray]) -> list[str]:
        return list(self.trainable_tensors) if self.trainable_tensors else sorted(base_tensors)

    def _client_variate(self) -> dict[str, np.ndarray]:
        return self._state.variate() if self._state is not None else self._variate

    def _server_control(self, base: Manifest, base_tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The server variate c the base names, fetched by CID and checked against the base's tensors."""
        cid = server_control_cid(base.extra)
        if not cid:
            return {}
        if self._server_variate[0] == cid:
            return self._server_variate[1]
        fetched = self._transfer.fetch(cid)
        assert fetched is not None  # without if_none_match, fetch never answers "not modified"
        manifest, blob = fetched
        try:
            tensors = decode_tensors(blob)
        except CodecError as exc:
            raise IntegrityError(f"server variate {cid}: {exc}", reason="bad_control_variate") from None
        if (
            manifest.kind != CONTROL_KIND
            or manifest.federation != self.federation
            or set(tensors) != set(base_tensors)
            or any(tensors[n].shape != base_tensors[n].shape or not np.all(np.isfinite(tensors[n])) for n in tensors)
        ):
            raise IntegrityError(
                f"{cid} is not a finite server variate of {self.federation!r} shaped like the base",
                reason="bad_control_variate",
            )
        self._server_variate = (cid, tensors)
        return tensors

    def _variate_update(
        self, held: tuple[Manifest, dict[str, np.ndarray]], weights: Mapping[str, np.ndarray], metrics: Mapping[str, float]
    ) -> tuple[bytes, dict[str, np.ndarray] | None]:
        """(SCAFFOLD's delta_c blob, c_i+) for an update trained from the held base; (b"", None) when off.
        The trainer's metrics say how many steps (scaffold_steps) of what size (scaffold_lr) it took."""
        if not scaffold_enabled(self.round_config):
            return b"", None
        try:
            steps, lr = int(metrics[SCAFFOLD_STEPS]), float(metrics[SCAFFOLD_LR])
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(
                f"federation {self.federation!r} runs SCAFFOLD: the trainer must report metrics "
                f"{SCAFFOLD_STEPS} and {SCAFFOLD_LR}", reason="bad_scaffold_metrics"
            ) from None
        names = self._trained_names(held[1])
        delta, variate = variate_update(
            held[1],
            {name: weights[name] for name in names},
            self._server_control(held[0], held[1]),
            self._client_variate(),
            steps=steps,
            lr=lr,
        )
        return encode_tensors(delta), variate

    def _encode(
        self, weights: Mapping[str, np.ndarray], *, base_tensors: Mapping[str, np.ndarray]
    ) -> tuple[tuple[bytes, Encoding] | None, dict[str, np.ndarray] | None]:
        """(The update's bytes and encoding, top-k's residual after it) in the encoding the home asks for
        (round_config["encoding"]); (None, None) for float32.

        Top-k adds the residual owed so far (error feedback): kept in the state directory, or in
        memory without one. The new residual counts only once this update is acknowledged."""
        encoding = federation_encoding(self.round_config)
        if not encoding.is_delta:
            return None, None
        residual: Mapping[str, np.ndarray] | None = None
        if encoding.kind == "topk":
            residual = self._state.residual() if self._state is not None else self._residual
        blob, left = encode_weights(
            weights, base_tensors=base_tensors, encoding=encoding, tensors=self.trainable_tensors, residual=residual
        )
        return (blob, encoding), (left if encoding.kind == "topk" else None)

    def _base_round(self, base_cid: str) -> int:
        """The round `base_cid` is the base of, as the home announced it: still the latest, or the one
        handed out by `wait_for_model` (a newer base may have arrived while this one was trained on)."""
        latest = self._session.latest
        if latest is not None and latest.model_cid == base_cid:
            return latest.round
        if base_cid == self._returned_cid and self._returned_round is not None:
            return self._returned_round
        held = self._transfer.held
        return held[0].round if held is not None else 0

    def resend_pending(self) -> SubmitReceipt | None:
        """After a restart: send the update that was written but never acknowledged, if any."""
        return self._submitter.resend_pending()

    def submit_signed(
        self,
        manifest: Manifest,
        blob: bytes,
        *,
        tensors: Sequence[str] = (),
        base_metrics: Mapping[str, float] | None = None,
    ) -> SubmitReceipt:
        """Upload an update whose manifest the caller built and signed (e.g. a relay's combined
        update, kind "relay"): the header is filled from the manifest, which travels with it.

        `tensors` declares a partial update. Not persisted as this client's pending update.
        Raises SubmitRefused with the aggregator's reason code when it is refused.
        """
        return self._submitter.send_signed(manifest, blob, tensors, base_metrics)

    def already_submitted(self, model_cid: str) -> bool:
        """True when an update trained on `model_cid` was acknowledged (as remembered across restarts)."""
        return self._submitter.already_submitted(model_cid)

    # ------------------------------------------------------------------ revocation

    @property
    def revocations_version(self) -> int:
        """The version of the revocation list the home enforces, as its last heartbeat said (0: none)."""
        return self._session.revocations_version

    def revocations(self, known_version: int = 0) -> RevocationList | None:
        """The home's revocation list if it is newer than `known_version`, else None. Parsed, not verified:
        whoever installs it verifies the CA's signature. What a relay serves its own devices by."""
        try:
            with self._session.unless_closed():
                reply = self._session.stub().GetRevocations(
                    pb.GetRevocationsRequest(known_version=known_version), timeout=self._session.rpc_timeout_s
                )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return revocations_from_reply(reply)

    def describe(self) -> dict[str, Any]:
        latest = self._session.latest
        return {
            "agent_id": self.agent_id,
            "home": self.home_id,
            "address": self.home_address,
            "round": latest.round if latest else None,
            "model": latest.model_cid if latest else None,
        }
