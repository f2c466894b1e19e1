"""Real `strata` processes for integration tests: start, read their JSON log events, stop.

    from tests.procs import procs_fixture  # noqa: F401  (registers the `procs` fixture)

    def test_something(procs, tmp_path):
        port = free_port()
        agg = procs.strata("aggregator", "serve", "--set", f"listen=127.0.0.1:{port}", name="agg")
        agg.wait_for_event("aggregator_started", timeout=30)
        wait_healthy(f"127.0.0.1:{port}", timeout=10)
        agg.kill9()

Every process gets its own HOME (so nothing touches the real ~/.strata) and no
inherited STRATA_* variables. Its stderr (one JSON event per line) and stdout go
to files in the test's directory, read back incrementally, so a chatty process can
never block on a full pipe. Every wait is bounded; the `procs` fixture stops every
process it started at teardown, by PID, SIGTERM first and SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

POLL_S = 0.05
DEFAULT_TIMEOUT_S = 30.0

Event = dict[str, Any]
EventPredicate = Callable[[Event], bool]


def strata_command() -> list[str]:
    """How to run the `strata` CLI with this interpreter: its console script when installed beside it."""
    script = Path(sys.executable).with_name("strata")
    if script.is_file() and os.access(script, os.X_OK):
        return [sys.executable, str(script)]
    # `python -m strata.cli` would import strata.cli twice (as __main__ and by name), so call main() instead
    return [sys.executable, "-c", "import sys; from strata.cli import main; sys.exit(main())"]


def clean_env(home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test process: ours minus STRATA_* settings, with its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Return once something accepts TCP connections on host:port; TimeoutError after `timeout`."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as exc:
            if time.monotonic() >= give_up:
                raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s: {exc}") from None
            time.sleep(POLL_S)


def wait_healthy(
    address: str, timeout: float = DEFAULT_TIMEOUT_S, *, service: str = "", credentials: Any = None
) -> None:
    """Return once the grpc.health.v1 check of `service` at `address` answers SERVING (over TLS with
    `credentials`, a grpc.ChannelCredentials, e.g. a bundle's)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    give_up = time.monotonic() + timeout
    last = "no answer"
    channel_for = grpc.insecure_channel if credentials is None else (lambda a: grpc.secure_channel(a, credentials))
    with channel_for(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} was not SERVING within {timeout}s (last: {last})")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(1.0, remaining))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = str(exc.code())
            time.sleep(POLL_S)


class StrataProcess:
    """One started process whose stderr is a stream of JSON log events."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        workdir: str | Path,
        name: str = "strata",
        env: Mapping[str, str] | None = None,
        home: str | Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = Path(home) if home is not None else self.workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.workdir / f"{name}.stderr.log"
        self.stdout_path = self.workdir / f"{name}.stdout.log"
        self._argv = [*(command if command is not None else strata_command()), *self.args]
        self._env = clean_env(self.home, env)
        self._events: list[Event] = []
        self._other_lines: list[str] = []
        self._offset = 0
        self._partial = b""
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StrataProcess:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        # append: a restart under the same name keeps one log file; this run reads from its own start
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self._offset = err.tell()
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self._env, cwd=self.workdir
            )
        return self

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        return self._require().poll()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self._proc

    def kill9(self, timeout: float = 10.0) -> int:
        """SIGKILL this process (only this PID) and reap it; returns its exit status."""
        proc = self._require()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns its exit status."""
        proc = self._require()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10.0)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Wait for the process to exit on its own; TimeoutError (and it keeps running) otherwise."""
        try:
            return self._require().wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout}s\n{self.tail()}") from None

    def __enter__(self) -> StrataProcess:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.terminate()

    # ------------------------------------------------------------------ events

    def _read_new(self) -> None:
        try:
            with open(self.stderr_path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # the last piece has no newline yet
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._other_lines.append(line)
                continue
            if isinstance(event, dict) and "event" in event:
                self._events.append(event)
            else:
                self._other_lines.append(line)

    def events(self, name: str | None = None, predicate: EventPredicate | None = None) -> list[Event]:
        """Every event this run has logged so far, oldest first (a restart is a new StrataProcess)."""
        self._read_new()
        return [
            e for e in self._events if (name is None or e["event"] == name) and (predicate is None or predicate(e))
        ]

    def wait_for_event(
        self,
        name: str,
        predicate: EventPredicate | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        after: int = 0,
    ) -> Event:
        """The first event called `name` (matching `predicate`) among events[after:], waiting up to `timeout`.

        Raises TimeoutError (with the log's tail) if it does not appear in time, or
        RuntimeError at once if the process exits without logging it.
        """
        give_up = time.monotonic() + timeout
        while True:
            self._read_new()
            for event in self._events[after:]:
                if event["event"] == name and (predicate is None or predicate(event)):
                    return event
            if self._proc is not None and self._proc.poll() is not None:
                self._read_new()
                for event in self._events[after:]:
                    if event["event"] == name and (predicate is None or predicate(event)):
                        return event
                raise RuntimeError(
                    f"{self.name} exited with {self._proc.returncode} before logging {name!r}\n{self.tail()}"
                )
            if time.monotonic() >= give_up:
                raise TimeoutError(f"{self.name} did not log {name!r} within {timeout}s\n{self.tail()}")
            time.sleep(POLL_S)

    def event_count(self) -> int:
        """How many events were read so far: pass as `after=` to wait only for newer ones."""
        self._read_new()
        return len(self._events)

    def tail(self, lines: int = 30) -> str:
        """The last lines of stderr, for assertion messages."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"[{self.name}: no stderr]"
        return f"--- {self.name} stderr (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def run_strata(
    *args: str,
    home: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one short `strata` command to completion and capture its output (bounded by `timeout`)."""
    Path(home).mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [*strata_command(), *args],
        env=clean_env(home, env),
        cwd=cwd or home,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ProcessFactory:
    """Starts StrataProcesses under one directory and stops them all on `stop_all`."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.started: list[StrataProcess] = []

    def strata(
        self,
        *args: str,
        name: str = "strata",
        env: Mapping[str, str] | None = None,
        home: str | Path | None = None,
    ) -> StrataProcess:
        """Start `strata ARGS...`; HOME defaults to <workdir>/home shared by this test's processes."""
        return self.spawn(args, name=name, env=env, home=home)

    def spawn(
        self,
        args: Sequence[str],
        *,
        name: str = "proc",
        env: Mapping[str, str] | None = None,
        home: str | Path | None = None,
        command: Sequence[str] | None = None,
    ) -> StrataProcess:
        """Start any command (default: the strata CLI) with the test environment."""
        process = StrataProcess(
            args, workdir=self.workdir, name=name, env=env, home=home or self.workdir / "home", command=command
        )
        self.started.append(process)
        return process.start()

    def stop_all(self, timeout: float = 5.0) -> None:
        for process in reversed(self.started):
            with contextlib.suppress(Exception):
                if process.alive:
                    process.terminate(timeout)


@pytest.fixture(name="procs")
def procs_fixture(tmp_path: Path) -> Iterator[ProcessFactory]:
    """A ProcessFactory writing under tmp_path/procs; every process it started is stopped at teardown."""
    factory = ProcessFactory(tmp_path / "procs")
    try:
        yield factory
    finally:
        factory.stop_all()

