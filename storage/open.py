"""Opening a content store from a URL: the one place that knows every kind of store.

`storage.store` (the contract, LocalStore, LayeredStore) and `storage.ipfs`
(IpfsStore, which subclasses the contract) do not know each other's URLs; this
module imports both, `storage.ipfs` only when an ipfs: URL asks for it, since
ipfshttpclient is slow to import.
"""

from __future__ import annotations

import re

from proto.errors import InvalidInput
from storage.store import ContentStore, LocalStore

__all__ = ["open_store"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$")


def open_store(url: str) -> ContentStore:
    """Open a store from a URL: "local:/path" or a plain path gives a LocalStore.

    "ipfs:/ip4/HOST/tcp/PORT/http" or "ipfs:/dns/NAME/tcp/PORT/http" gives an IpfsStore
    talking to that Kubo node's RPC API (see storage.ipfs).
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("store URL must be a non-empty string", reason="bad_store_url")
    match = _SCHEME.match(url)
    if match is None:
        return LocalStore(url)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "local":
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise InvalidInput(f"store URL {url!r} names no directory", reason="bad_store_url")
        return LocalStore(rest)
    if scheme == "ipfs":
        from storage.ipfs import from_url  # lazy: ipfshttpclient is slow to import

        return from_url(url)
    raise InvalidInput(
        f"unknown store URL scheme {scheme!r} in {url!r} (expected 'local:' or a path)",
        reason="bad_store_url",
    )
