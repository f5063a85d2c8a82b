"""LRU + TTL caches for query embeddings and rerank scores, safe to share between threads.

Keys:
- query embedding: (embedder model id, query text)
- rerank score: (reranker model id, query text, hash of the document text). The document text is
  what the cross-encoder reads, so its hash changes exactly when the product's text changes: it stands
  for (product id, product version) without the scorer needing to know product ids.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TTLCache

V = TypeVar("V")


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


class LruTtlCache(Generic[V]):
    """A bounded cache: least recently used entries go first, every entry expires after `ttl_s`.

    `maxsize=0` disables it (every lookup misses, nothing is stored). `on_lookup(hit)` feeds metrics.
    """

    def __init__(
        self,
        name: str,
        maxsize: int,
        ttl_s: float,
        on_lookup: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.name = name
        self.enabled = maxsize > 0
        self._cache: TTLCache[Hashable, V] = TTLCache(maxsize=max(1, maxsize), ttl=ttl_s)
        self._lock = threading.Lock()
        self._on_lookup = on_lookup
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        if not self.enabled:
            value = None
        else:
            with self._lock:
                value = self._cache.get(key)
        self._count(value is not None)
        return value

    def put(self, key: Hashable, value: V) -> None:
        if self.enabled:
            with self._lock:
                self._cache[key] = value

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache) if self.enabled else 0

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if self._on_lookup is not None:
            self._on_lookup(self.name, hit)
