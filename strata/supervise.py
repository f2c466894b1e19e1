"""Starting and stopping the daemons of a local fleet as child processes (used by `strata demo`).

Each child is a `strata ...` command in its own process group with its log
going to a file. `stop_all` sends SIGTERM, waits a bounded time, then SIGKILLs
what is left: only the processes this supervisor started, by PID.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from proto.errors import Unavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise Unavailable(f"nothing listened on {host}:{port} within {timeout_s:.0f}s", reason="start_timeout")


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, args: Sequence[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
        process = subprocess.Popen(
            [sys.executable, "-m", "strata", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops children itself
        )
        child = Child(name=name, process=process, log_path=log_path, _log=log)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None and code != 0:
                tail = child.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise Unavailable(
                    f"{child.name} exited with code {code}; see {child.log_path}: {' | '.join(tail)}",
                    reason="child_failed",
                )

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child, wait up to `timeout_s` in total, then SIGKILL the rest."""
        for child in self.children:
            if child.alive:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout=5.0)
            child._log.close()
        self.children.clear()
