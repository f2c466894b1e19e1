"""Kubo-compatible content identifiers: a blob's CID is what `ipfs add` prints for it.

Kubo's defaults, reproduced here byte for byte:

- CIDv0: the base58btc text of a sha2-256 multihash (``0x12 0x20`` + 32-byte
  digest), always 46 characters starting with ``Qm``;
- fixed-size chunks of ``CHUNK_SIZE`` bytes;
- every chunk becomes a dag-pb leaf holding UnixFS ``Data{Type=File, Data=chunk,
  filesize=len(chunk)}`` (not a raw leaf);
- a balanced DAG of dag-pb nodes with at most ``MAX_LINKS`` children each, where an
  inner node holds UnixFS ``Data{Type=File, filesize, blocksizes}``;
- a one-chunk file is its leaf; the empty file is one leaf with no data.

Hashing a leaf feeds sha256 a few bytes of protobuf framing, the chunk itself
(a memoryview, never a copy) and a few more bytes, so computing a CID costs one
sha256 pass over the data plus a little framing per 256 KiB.
"""

from __future__ import annotations

import hashlib

from proto.errors import InvalidInput

__all__ = ["CHUNK_SIZE", "MAX_LINKS", "CidBuilder", "cid_of", "is_cid", "validate_cid"]

CHUNK_SIZE = 262144
MAX_LINKS = 174

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {ch: i for i, ch in enumerate(_B58_ALPHABET)}
_SHA2_256_PREFIX = b"\x12\x20"  # multihash: code sha2-256, digest length 32
_MULTIHASH_LEN = 34
_CIDV0_TEXT_LEN = 46

_UNIXFS_TYPE_FILE = b"\x08\x02"  # field 1 (Type), varint, File = 2


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _b58encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58_ALPHABET[rem])
    leading_zeros = len(raw) - len(raw.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(digits))


def _b58decode(text: str) -> bytes | None:
    """Decode base58btc; None if any character is outside the alphabet."""
    number = 0
    for ch in text:
        digit = _B58_INDEX.get(ch)
        if digit is None:
            return None
        number = number * 58 + digit
    leading_ones = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * leading_ones + body


def _leaf_framing(length: int) -> tuple[bytes, bytes]:
    """dag-pb bytes before and after a non-empty chunk of `length` bytes in its leaf node."""
    size = _varint(length)
    unixfs_head = _UNIXFS_TYPE_FILE + b"\x12" + size  # field 2 (Data), bytes
    unixfs_tail = b"\x18" + size  # field 3 (filesize), varint
    unixfs_len = len(unixfs_head) + length + len(unixfs_tail)
    node_head = b"\x0a" + _varint(unixfs_len)  # PBNode field 1 (Data), bytes
    return node_head + unixfs_head, unixfs_tail


_FULL_CHUNK_FRAMING = _leaf_framing(CHUNK_SIZE)
# The empty file: a leaf whose UnixFS data has no Data field and filesize 0.
_EMPTY_LEAF = b"\x0a\x04" + _UNIXFS_TYPE_FILE + b"\x18\x00"


class _Link:
    """What a parent needs to know about a child: its multihash, Tsize and file bytes."""

    __slots__ = ("multihash", "tree_size", "file_size")

    def __init__(self, multihash: bytes, tree_size: int, file_size: int) -> None:
        self.multihash = multihash
        self.tree_size = tree_size  # encoded bytes of the child and everything below it
        self.file_size = file_size  # file bytes under the child


def _inner_node(children: list[_Link]) -> _Link:
    """Encode a dag-pb inner node over `children` and return the link to it."""
    parts = []
    for child in children:
        # PBLink: Hash (field 1), Name (field 2, empty but present), Tsize (field 3)
        link = b"\x0a\x22" + child.multihash + b"\x12\x00" + b"\x18" + _varint(child.tree_size)
        parts.append(b"\x12" + _varint(len(link)) + link)  # PBNode field 2 (Links)
    file_size = sum(child.file_size for child in children)
    unixfs = (
        _UNIXFS_TYPE_FILE
        + b"\x18"
        + _varint(file_size)
        + b"".join(b"\x20" + _varint(child.file_size) for child in children)  # blocksizes
    )
    # dag-pb puts Links before Data on the wire, although Data has the lower field number.
    parts.append(b"\x0a" + _varint(len(unixfs)) + unixfs)
    node = b"".join(parts)
    multihash = _SHA2_256_PREFIX + hashlib.sha256(node).digest()
    return _Link(multihash, len(node) + sum(child.tree_size for child in children), file_size)


class _BalancedDag:
    """Kubo's balanced UnixFS layout, built bottom-up as chunks stream in.

    levels[0] holds links to leaves not yet under a parent, levels[k] links to
    depth-k nodes. A level is folded into one parent as soon as it holds
    `max_links` links, so memory is bounded by max_links links per level.
    Chunk size and fan-out are parameters only so tests can exercise deep trees
    on small inputs; CIDs use CHUNK_SIZE and MAX_LINKS.
    """

    def __init__(self, chunk_size: int, max_links: int) -> None:
        if chunk_size < 1 or max_links < 2:
            raise ValueError("chunk_size must be >= 1 and max_links >= 2")
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._full_framing = (
            _FULL_CHUNK_FRAMING if chunk_size == CHUNK_SIZE else _leaf_framing(chunk_size)
        )
        self._pending = bytearray()  # the start of a chunk, when input ended mid-chunk
        self._levels: list[list[_Link]] = [[]]
        self._size = 0
        self._result: str | None = None

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._result is not None:
            raise ValueError("update() after finish()")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._size += view.nbytes
        chunk_size = self._chunk_size
        offset = 0
        if self._pending:
            take = min(chunk_size - len(self._pending), len(view))
            self._pending += view[:take]
            offset = take
            if len(self._pending) < chunk_size:
                return
            self._add_leaf(memoryview(self._pending))
            self._pending = bytearray()
        # Whole chunks are hashed straight out of the caller's buffer.
        end = offset + (len(view) - offset) // chunk_size * chunk_size
        for start in range(offset, end, chunk_size):
            self._add_leaf(view[start : start + chunk_size])
        if end < len(view):
            self._pending = bytearray(view[end:])

    def finish(self) -> str:
        if self._result is not None:
            return self._result
        if self._pending:
            self._add_leaf(memoryview(self._pending))
            self._pending = bytearray()
        if self._size == 0:
            self._levels[0].append(
                _Link(_SHA2_256_PREFIX + hashlib.sha256(_EMPTY_LEAF).digest(), len(_EMPTY_LEAF), 0)
            )
        levels = self._levels
        level = 0
        # Fold partial levels upward; the lone link on the highest level is the root.
        # A partial level below the top still gets its own parent, even with one child,
        # because Kubo's balanced builder fills every subtree to the same depth.
        while level < len(levels) - 1 or len(levels[level]) > 1:
            if levels[level]:
                self._push(level + 1, _inner_node(levels[level]))
                levels[level] = []
            level += 1
        self._result = _b58encode(levels[level][0].multihash)
        return self._result

    def _add_leaf(self, chunk: memoryview) -> None:
        length = len(chunk)
        head, tail = self._full_framing if length == self._chunk_size else _leaf_framing(length)
        digest = hashlib.sha256(head)
        digest.update(chunk)
        digest.update(tail)
        leaf = _Link(_SHA2_256_PREFIX + digest.digest(), len(head) + length + len(tail), length)
        self._push(0, leaf)

    def _push(self, level: int, link: _Link) -> None:
        if level == len(self._levels):
            self._levels.append([])
        siblings = self._levels[level]
        siblings.append(link)
        if len(siblings) == self._max_links:
            self._levels[level] = []
            self._push(level + 1, _inner_node(siblings))


class CidBuilder:
    """Streaming CID computation: feed bytes in pieces of any size, then finish().

    Holds at most one chunk of input plus up to MAX_LINKS pending links per tree level.
    The caller's buffers are hashed in place; only a chunk split across update()
    calls is copied.
    """

    def __init__(self) -> None:
        self._dag = _BalancedDag(CHUNK_SIZE, MAX_LINKS)

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._dag.size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._dag.update(data)

    def finish(self) -> str:
        """The CID of everything fed so far. Calling it again returns the same CID."""
        return self._dag.finish()


def cid_of(data: bytes | bytearray | memoryview) -> str:
    """The CIDv0 `ipfs add` (Kubo defaults) prints for `data`."""
    builder = CidBuilder()
    builder.update(data)
    return builder.finish()


def is_cid(text: str) -> bool:
    """True if `text` is a syntactically valid CIDv0: base58btc of a sha2-256 multihash."""
    if not isinstance(text, str) or len(text) != _CIDV0_TEXT_LEN:
        return False
    raw = _b58decode(text)
    return raw is not None and len(raw) == _MULTIHASH_LEN and raw.startswith(_SHA2_256_PREFIX)


def validate_cid(text: str) -> str:
    """Return `text` if it is a valid CIDv0, else raise InvalidInput(reason="bad_cid")."""
    if is_cid(text):
        return text
    shown = repr(text) if len(repr(text)) <= 80 else repr(text)[:77] + "..."
    raise InvalidInput(
        f"not a CIDv0 (46 base58btc characters encoding a sha2-256 multihash, 'Qm...'): {shown}",
        reason="bad_cid",
    )
