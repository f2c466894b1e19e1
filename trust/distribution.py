"""How the revocation list travels: CA directory -> coordinator -> aggregators -> relays, without restarts.

`strata certs revoke` re-signs the list into the CA directory. The coordinator (which
has the directory, `ca_dir`) reads it through a `RevocationFile`, enforces it on its
own port, names its version in every Lease and serves it (CoordinatorService
GetRevocations). Each aggregator's lease heartbeat sees the version; when it is newer
than the list the aggregator enforces, a `RevocationFollower` fetches and installs it
(`trust.security.Security.set_revocations`, which verifies the CA signature and
refuses older versions). A home serves the list it enforces to the relays below it
(`intake.service.AgentServicer`: GetRevocations, and the version in every
HeartbeatReply), and each relay follows its home the same way. So a revoked caller is
refused everywhere within about one heartbeat interval per hop.

Nothing here trusts the transport: a list counts only once the CA's signature verifies,
wherever it came from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509

from proto.errors import StrataError
from trust.identity import load_certificate
from trust.messages import version_of
from trust.revocation import RevocationList

__all__ = ["RevocationFile", "RevocationFollower"]

log = logging.getLogger("strata.trust.revocations")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RevocationFile:
    """The signed list in a CA directory, re-read when the file changes (one stat() per look).

    `current()` is the newest verified list seen. A file that does not parse or verify,
    or that goes back a version, is logged once and the previous list stays in force.
    """

    def __init__(self, path: str | Path, ca_cert: x509.Certificate | bytes | str) -> None:
        self.path = Path(path)
        self._ca = load_certificate(ca_cert)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._list: RevocationList | None = None

    def current(self) -> RevocationList | None:
        stamp = _stamp(self.path)
        with self._lock:
            if stamp is None or stamp == self._stamp:
                return self._list
            self._stamp = stamp
            try:
                found = RevocationList.from_bytes(self.path.read_bytes()).verify_with(self._ca)
            except (StrataError, OSError) as e:
                log.warning("revocations_unreadable", extra={"fields": {"path": str(self.path), "error": str(e)[:200]}})
                return self._list
            if self._list is not None and found.version < self._list.version:
                log.warning(
                    "revocations_went_back",
                    extra={"fields": {"path": str(self.path), "found": found.version, "keeping": self._list.version}},
                )
                return self._list
            if self._list is None or found.version > self._list.version:
                self._list = found
            return self._list

    @property
    def version(self) -> int:
        return version_of(self.current())


class _Installs(Protocol):
    @property
    def revocations_version(self) -> int: ...

    def set_revocations(self, revocations: RevocationList) -> bool: ...


class RevocationFollower:
    """Keeps the list a process enforces up with an upstream that announces versions (a lease, a heartbeat).

    `fetch(known_version)` asks the upstream (GetRevocations) and returns the list or None;
    `security` verifies and installs it. A failure is logged, and the next announcement at
    least `retry_s` later tries again (announcements come with every heartbeat).
    """

    def __init__(
        self,
        security: _Installs,
        fetch: Callable[[int], RevocationList | None],
        *,
        upstream: str,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._security = security
        self._fetch = fetch
        self.upstream = upstream
        self._retry_s = retry_s
        self._clock = clock
        self._failed_at = float("-inf")

    def announced(self, version: int) -> bool:
        """The upstream enforces list `version`: fetch and install it if it is newer than ours. True if installed."""
        held = self._security.revocations_version
        if version <= held or self._clock() - self._failed_at < self._retry_s:
            return False
        try:
            fetched = self._fetch(held)
            return fetched is not None and self._security.set_revocations(fetched)
        except StrataError as e:
            self._failed_at = self._clock()
            log.warning(
                "revocations_fetch_failed",
                extra={"fields": {"upstream": self.upstream, "version": version, "held": held, "error": str(e)[:200]}},
            )
            return False


