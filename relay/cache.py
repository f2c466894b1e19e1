"""The relay's model cache: each model fetched from upstream once, kept by CID, evicted least recently used.

Devices download from the relay's store; a model the store lacks is fetched from
upstream (one fetch per CID, however many devices ask at once) and stored as its
manifest and weights. Eviction keeps the cached total under `max_bytes`, oldest
use first, and never evicts a protected model (the current base). The counters
say how much upstream traffic the cache saved: bytes devices downloaded minus
bytes fetched upstream.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proto.errors import IntegrityError, NotFound
from storage.manifest import Manifest
from storage.models import load_manifest
from storage.store import ContentStore

log = logging.getLogger("strata.relay.cache")

# model CID -> its verified manifest and weight bytes, from upstream
# kinds the relay writes itself rather than fetches
_OWN_KINDS = ("local", "relay")
Fetcher = Callable[[str], tuple[Manifest, bytes]]


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    models: int
    cached_bytes: int
    upstream_fetches: int
    # ensure() answered from the store, without going upstream
    hits: int
    bytes_fetched_upstream: int
    bytes_served: int
    downloads_served: int
    evictions: int

    @property
    def bytes_saved(self) -> int:
        """Upstream bytes the cache saved: what devices downloaded minus what was fetched for them."""
        return self.bytes_served - self.bytes_fetched_upstream

    def to_json(self) -> dict[str, int]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "bytes_saved": self.bytes_saved}


@dataclass(frozen=True, kw_only=True)
class _Entry:
    weights_cid: str
    size: int


class ModelCache:
    def __init__(self, store: ContentStore, fetch: Fetcher, *, max_bytes: int) -> None:
        self._store = store
        self._fetch = fetch
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._protected: frozenset[str] = frozenset()
        self._fetches = self._fetched_bytes = self._served_bytes = self._served = self._evictions = self._hits = 0

    def ensure(self, model_cid: str) -> Manifest:
        """The model's manifest, with manifest and weights in the store: from the cache, else fetched once."""
        with self._lock:
            gate = self._fetching.setdefault(model_cid, threading.Lock())
        with gate:
            if self._store.has(model_cid):
                manifest = load_manifest(self._store, model_cid)
                if self._store.has(manifest.weights):
                    with self._lock:
                        self._hits += 1
                    self._remember(model_cid, manifest)
                    return manifest
            manifest, weights = self._fetch(model_cid)
            if manifest.cid != model_cid:
                raise IntegrityError(f"upstream answered {manifest.cid} for {model_cid}", reason="hash_mismatch")
            self._store.put(weights)
            self._store.put(manifest.to_bytes())
            with self._lock:
                self._fetches += 1
                self._fetched_bytes += len(weights)
            log.info(
                "model_fetched_upstream",
                extra={"fields": {"model": model_cid, "bytes": len(weights), "round": manifest.round}},
            )
            self._remember(model_cid, manifest)
            return manifest

    def protect(self, model_cids: Iterable[str]) -> None:
        """Models that must stay cached (the current base), whatever their age."""
        with self._lock:
            self._protected = frozenset(model_cids)

    def record_served(self, weight_bytes: int) -> None:
        """A device downloaded `weight_bytes` of model weights from the relay."""
        with self._lock:
            self._served += 1
            self._served_bytes += weight_bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                models=len(self._entries),
                cached_bytes=sum(e.size for e in self._entries.values()),
                upstream_fetches=self._fetches,
                hits=self._hits,
                bytes_fetched_upstream=self._fetched_bytes,
                bytes_served=self._served_bytes,
                downloads_served=self._served,
                evictions=self._evictions,
            )

    def cached(self) -> list[str]:
        """Cached model CIDs, least recently used first."""
        with self._lock:
            return list(self._entries)

    def _remember(self, model_cid: str, manifest: Manifest) -> None:
        if manifest.kind in _OWN_KINDS:
            return  # the relay's own records (device and combined updates) are not the cache's to evict
        with self._lock:
            if model_cid in self._entries:
                self._entries.move_to_end(model_cid)
                return
            size = len(manifest.to_bytes()) + self._store.size(manifest.weights)
            self._entries[model_cid] = _Entry(weights_cid=manifest.weights, size=size)
            self._evict_over_budget()

    def _evict_over_budget(self) -> None:
        total = sum(e.size for e in self._entries.values())
        for model_cid in list(self._entries):
            if total <= self._max_bytes:
                return
            if model_cid in self._protected:
                continue
            entry = self._entries.pop(model_cid)
            total -= entry.size
            self._evictions += 1
            still_used = any(e.weights_cid == entry.weights_cid for e in self._entries.values())
            for cid in (model_cid,) if still_used else (model_cid, entry.weights_cid):
                try:
                    self._store.delete(cid)
                except NotFound:
                    pass
            log.info("model_evicted", extra={"fields": {"model": model_cid, "bytes": entry.size}})
