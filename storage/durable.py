"""One durable SQLite base for every journal, outbox and index Strata keeps.

WAL mode with synchronous=FULL: a write that returned has reached the disk, so
whatever a daemon acknowledged after `_write` survives kill -9. Each `_write`
is one transaction (all its statements or none). Thread-safe: one connection,
one lock.

Schemas are versioned with SQLite's `user_version`. A subclass names its
`SCHEMA` and `SCHEMA_VERSION`; opening a file written with another version is
refused with a clear error instead of failing later on a missing column.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from proto.errors import FailedPrecondition, NotFound

Statement = tuple[str, tuple[Any, ...]]

# the largest integer a SQLite column holds (signed 64-bit); protobuf's uint64 goes twice as far,
# so a number from the wire is checked against this before it reaches a query
MAX_INTEGER = (1 << 63) - 1


class DurableSqlite:
    """A SQLite file (or, with `path=None`, a private in-memory database) with durable writes."""

    SCHEMA = ""
    SCHEMA_VERSION = 1
    # FULL: a returned write survives power loss. NORMAL (WAL): it survives the process being
    # killed, and only the last transactions may be lost with the power; for what can be rebuilt.
    SYNCHRONOUS = "FULL"

    def __init__(self, path: str | Path | None, *, readonly: bool = False) -> None:
        """Open (creating if needed) the database; `readonly` opens an existing one for
        inspection (e.g. `strata history`) while its owner keeps writing."""
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is None:
            self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            self._db.executescript(self.SCHEMA)
            return
        if readonly:
            if not self.path.exists():
                raise NotFound(f"no journal at {self.path}", reason="not_found")
            self._db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA busy_timeout=5000")
            self._check_version(fresh=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self.SYNCHRONOUS}")
        self._db.execute("PRAGMA busy_timeout=5000")
        fresh = not self._db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        self._check_version(fresh=fresh)
        self._db.executescript(self.SCHEMA)
        if fresh:
            self._db.execute(f"PRAGMA user_version={int(self.SCHEMA_VERSION)}")

    def _check_version(self, *, fresh: bool) -> None:
        if fresh:
            return
        found = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if found != self.SCHEMA_VERSION:
            self._db.close()
            raise FailedPrecondition(
                f"{self.path} holds a {type(self).__name__} of schema version {found}; this Strata reads "
                f"version {self.SCHEMA_VERSION}. Start with a fresh state_dir (or keep the old one with the "
                "Strata release that wrote it).",
                reason="journal_version",
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, statements: Sequence[Statement]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, args)
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()
