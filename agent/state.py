"""What an agent keeps on disk: its identity, its key, the last base it trained on, and a pending update.

A pending update is written (atomically) before it is sent and removed once the
aggregator acknowledged it, so an agent killed mid-upload resends exactly the
same bytes after a restart, which the aggregator acknowledges as a duplicate
instead of counting twice.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.codec import CodecError, decode_tensors, encode_tensors
from storage.keys import KeyPair

# top-k's error-feedback residual (storage.encodings): what the sent updates left out so far
RESIDUAL_FILE = "topk_residual.safetensors"
# the residual once the pending update is acknowledged
NEXT_RESIDUAL_FILE = "topk_residual.next.safetensors"
# SCAFFOLD's client control variate c_i, and what it becomes once the pending update is acknowledged
VARIATE_FILE = "scaffold_variate.safetensors"
NEXT_VARIATE_FILE = "scaffold_variate.next.safetensors"


@dataclass(kw_only=True)
class PendingUpdate:
    round: int
    base_cid: str
    num_samples: int
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    tensors: list[str]
    manifest: str  # canonical manifest JSON text
    weights_file: str
    # SCAFFOLD's delta_c blob sent with the update ("" without SCAFFOLD)
    control_file: str = ""


@dataclass(kw_only=True)
class AgentProgress:
    agent_id: str
    last_base_cid: str = ""
    last_submitted_round: int = -1
    last_submitted_base: str = ""
    last_update_cid: str = ""
    pending: PendingUpdate | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class AgentState:
    """The agent's state directory."""

    def __init__(self, directory: str | Path, *, agent_id: str = "") -> None:
        self.directory = Path(os.path.expanduser(str(directory)))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = KeyPair.load_or_create(self.directory / "agent.key")
        self._path = self.directory / "progress.json"
        self.progress = self._load(agent_id)

    def _load(self, agent_id: str) -> AgentProgress:
        if self._path.exists():
            raw = json.loads(self._path.read_text())
            pending = raw.pop("pending", None)
            progress = AgentProgress(**raw, pending=PendingUpdate(**pending) if pending else None)
            if agent_id and progress.agent_id != agent_id:
                # an explicitly configured id wins over the remembered one
                progress = AgentProgress(agent_id=agent_id)
            return progress
        progress = AgentProgress(agent_id=agent_id or f"agent-{secrets.token_hex(4)}")
        self._write(progress)
        return progress

    def _write(self, progress: AgentProgress) -> None:
        data = json.dumps(asdict(progress), indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".progress-")
        with os.fdopen(fd, "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._path)

    def save(self) -> None:
        self._write(self.progress)

    @property
    def agent_id(self) -> str:
        return self.progress.agent_id

    def set_pending(self, pending: PendingUpdate, weights: bytes, control: bytes = b"") -> None:
        if pending.control_file:
            self._write_file(pending.control_file, control)
        self._write_file(pending.weights_file, weights)
        self.progress.pending = pending
        self.save()

    def _write_file(self, name: str, data: bytes) -> None:
        """Write `name` in the state directory atomically and durably."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".blob-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / name)

    def pending_control(self) -> bytes | None:
        """The pending update's SCAFFOLD delta_c blob; b"" when it has none, None when it is lost."""
        pending = self.progress.pending
        if pending is None or not pending.control_file:
            return b""
        path = self.directory / pending.control_file
        return path.read_bytes() if path.exists() else None

    def pending_weights(self) -> bytes | None:
        pending = self.progress.pending
        if pending is None:
            return None
        path = self.directory / pending.weights_file
        return path.read_bytes() if path.exists() else None

    # ------------------------------------------------------------------ top-k error feedback

    def residual(self) -> dict[str, np.ndarray]:
        """What top-k encoding left out of the updates delivered so far (empty if none, or unreadable)."""
        path = self.directory / RESIDUAL_FILE
        if not path.exists():
            return {}
        try:
            return decode_tensors(path.read_bytes())
        except CodecError:  # a torn or foreign file: start over rather than refuse to train
            return {}

    def set_next_residual(self, residual: Mapping[str, np.ndarray]) -> None:
        """What will be owed once the pending update is delivered: it becomes `residual()` when the home
        acknowledges the pending update (`clear_pending`), and is dropped if that update is finally refused,
        so a resend after a crash or a lost answer never counts the residual twice or loses it."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".residual-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode_tensors(dict(residual)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / NEXT_RESIDUAL_FILE)

    # ------------------------------------------------------------------ SCAFFOLD's client variate

    def variate(self) -> dict[str, np.ndarray]:
        """SCAFFOLD's c_i as of the last acknowledged update (empty, i.e. zeros, before the first)."""
        path = self.directory / VARIATE_FILE
        if not path.exists():
            return {}
        try:
            return decode_tensors(path.read_bytes())
        except CodecError:  # a torn or foreign file: c_i = 0 is where SCAFFOLD starts anyway
            return {}

    def set_next_variate(self, variate: Mapping[str, np.ndarray]) -> None:
        """c_i once the pending update (which carries c_i+ - c_i) is acknowledged: it becomes `variate()`
        at `clear_pending` with an update CID and is dropped if that update is finally refused, so the
        agent's c_i always matches the delta_c its home counted."""
        self._write_file(NEXT_VARIATE_FILE, encode_tensors(dict(variate)))

    def clear_pending(self, *, update_cid: str) -> None:
        pending = self.progress.pending
        if pending is None:
            return
        self.progress.last_submitted_round = pending.round
        self.progress.last_submitted_base = pending.base_cid
        self.progress.last_update_cid = update_cid
        self.progress.history = (self.progress.history + [
            {"round": pending.round, "base": pending.base_cid, "update": update_cid, "metrics": pending.metrics}
        ])[-50:]
        self.progress.pending = None
        self.save()
        (self.directory / pending.weights_file).unlink(missing_ok=True)
        if pending.control_file:
            (self.directory / pending.control_file).unlink(missing_ok=True)
        next_variate = self.directory / NEXT_VARIATE_FILE
        if update_cid and next_variate.exists():
            os.replace(next_variate, self.directory / VARIATE_FILE)
        else:
            next_variate.unlink(missing_ok=True)
        next_residual = self.directory / NEXT_RESIDUAL_FILE
        if update_cid and next_residual.exists():
            os.replace(next_residual, self.directory / RESIDUAL_FILE)  # delivered: what it left out is owed now
        else:
            next_residual.unlink(missing_ok=True)
