"""Helpers for benchmarks that run a fleet as separate OS processes (bench/vs_flower.py).

`Fleet` starts processes with their output in log files and stops them, and every
process they started in turn, by pid. `Sampler` watches all of this process's
descendants: the summed RSS (total and server side), CPU time, and the loopback byte
counter, a few times a second.
"""

from __future__ import annotations

import bisect
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MIB = 1 << 20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, alive: subprocess.Popen | None = None) -> None:
    """Return once something accepts connections on 127.0.0.1:port."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{alive.args[0]} exited with {alive.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def loopback_bytes() -> int | None:
    """Bytes sent on `lo` so far, from /proc/net/dev (each packet counted once)."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # transmit bytes
    except OSError:
        return None
    return None


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Fleet:
    """Processes started for one run, stopped together (context manager)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
            )
        self.procs.append(proc)
        return proc

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM what we started (clients first), then SIGKILL every descendant still alive."""
        tree = _descendants()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in tree + _descendants():
            try:
                proc.kill()
            except psutil.Error:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


@dataclass
class Sample:
    at: float
    rss_total: int
    rss_server: int
    processes: int


@dataclass
class Sampler:
    """Every `interval_s`: the summed RSS of all descendants of this process (and of the
    subtree under `server_pid`) and their CPU time; every `loopback_interval_s` the
    loopback byte counter (a cheap read, so fine-grained enough to split short rounds).

    RSS is a sample, so a process that lives less than `interval_s` may be missed; the
    peak reported is the largest summed RSS seen at one instant. CPU time is each
    process's user+system time when last seen, so the last interval of a short-lived
    process is missed (an underestimate)."""

    interval_s: float = 0.25
    loopback_interval_s: float = 0.02
    server_pid: int | None = None
    # the machine is shared: below this much available memory the run is called off
    min_available: int = 3 << 30
    tripped: str | None = None
    samples: list[Sample] = field(default_factory=list)
    loopback: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (time, CPU seconds of all so far)
    lifetimes: dict[int, list] = field(default_factory=dict)  # pid -> [program, first seen, last seen]
    _cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Sampler:
        for target, name in ((self._run, "sampler"), (self._run_loopback, "loopback-sampler")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.samples.append(self._sample(me))
            self._stop.wait(self.interval_s)

    def _run_loopback(self) -> None:
        while not self._stop.is_set():
            sent = loopback_bytes()
            if sent is not None:
                self.loopback.append((time.time(), sent))
            self._stop.wait(self.loopback_interval_s)

    def _sample(self, me: int) -> Sample:
        at = time.time()
        parent: dict[int, int] = {}
        for proc in psutil.process_iter(["ppid"]):
            parent[proc.pid] = proc.info["ppid"] or 0
        ours, server = set(), set()
        for pid in parent:
            chain, cursor = [], pid
            while cursor and cursor != me and cursor in parent and len(chain) < 64:
                chain.append(cursor)
                cursor = parent[cursor]
            if cursor == me:
                ours.add(pid)
                if self.server_pid is not None and self.server_pid in chain:
                    server.add(pid)
        total = in_server = 0
        for pid in ours:
            try:
                proc = psutil.Process(pid)
                rss = proc.memory_info().rss
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += rss
            if pid in server:
                in_server += rss
            self._cpu[pid] = times.user + times.system
            if pid not in self.lifetimes:
                self.lifetimes[pid] = [_program(proc), at, at]
            self.lifetimes[pid][2] = at
        self.cpu.append((at, sum(self._cpu.values())))
        available = memory_available()
        if available is not None and available < self.min_available and self.tripped is None:
            self.tripped = (
                f"memory guard: the machine had {available / (1 << 30):.1f} GiB available "
                f"while this fleet held {total / (1 << 30):.1f} GiB RSS in {len(ours)} processes"
            )
        return Sample(at=at, rss_total=total, rss_server=in_server, processes=len(ours))

    # ---------------------------------------------------------------- summaries

    def peak_rss_mib(self) -> tuple[float, float]:
        """(largest summed RSS of all processes, largest of the server side), MiB."""
        if not self.samples:
            return 0.0, 0.0
        return max(s.rss_total for s in self.samples) / MIB, max(s.rss_server for s in self.samples) / MIB

    def max_processes(self) -> int:
        return max((s.processes for s in self.samples), default=0)

    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def cpu_at(self, when: float) -> float | None:
        return _interpolate(self.cpu, when)

    def loopback_at(self, when: float) -> float | None:
        return _interpolate(self.loopback, when)

    def lifetimes_of(self, program: str) -> list[float]:
        """Seconds each process running `program` was seen alive (first to last sample)."""
        return [last - first for name, first, last in self.lifetimes.values() if name == program]


def _program(proc: psutil.Process) -> str:
    """The program a process runs: the script for `python script ...`, else the executable."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return "?"
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python"):
        return os.path.basename(argv[1]) if argv[1] != "-m" or len(argv) < 3 else argv[2]
    return os.path.basename(argv[0]) if argv else "?"


def _interpolate(points: list[tuple[float, float]], when: float) -> float | None:
    """A sampled counter's value at `when`, linear between the samples around it."""
    if not points or when < points[0][0] or when > points[-1][0]:
        return None
    index = bisect.bisect_left(points, (when,))
    if index == 0:
        return float(points[0][1])
    (t0, v0), (t1, v1) = points[index - 1], points[index]
    return v0 + (v1 - v0) * ((when - t0) / (t1 - t0) if t1 > t0 else 0.0)
