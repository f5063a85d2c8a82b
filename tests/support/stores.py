"""Stores for the tests that run the same behaviour on both backends.

The OpenSearch side needs a node: `tests/opensearch/with-node` starts one and sets OPENSEARCH_URL.
Each store gets indexes of its own (a random prefix), deleted when it closes, so tests never share data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import opensearchpy
import pytest

from middleware.config import Settings

if TYPE_CHECKING:
    from middleware.backends.opensearch import OpenSearchBackend

OPENSEARCH_URL = os.environ.get("OPENSEARCH_URL")
SKIP_REASON = os.environ.get("SHOPSEARCH_TEST_OPENSEARCH_UNAVAILABLE") or (
    "OPENSEARCH_URL is not set: run through tests/opensearch/with-node, or point it at a cluster"
)
SHARDS = 2  # counts, terms and pages must come out exact across shards, not just on one


def opensearch_settings(url: str, **opensearch: object) -> Settings:
    """Settings for an OpenSearch backend at `url` whose writes are searchable when they return."""
    cfg = {"url": url, "write_refresh": "true", "replicas": 0, **opensearch}
    return Settings(_env_file=None, backend="opensearch", embedder="none", opensearch=cfg)


@contextmanager
def throwaway_opensearch(dim: int | None = None, **opensearch: object) -> Iterator[OpenSearchBackend]:
    """An OpenSearch backend on indexes of its own, deleted on exit; skips the test when no node is set."""
    if not OPENSEARCH_URL:
        pytest.skip(SKIP_REASON)
    from middleware.backends.opensearch import OpenSearchBackend

    prefix = f"shopsearch-test-{uuid.uuid4().hex[:8]}"
    settings = opensearch_settings(OPENSEARCH_URL, index_prefix=prefix, **opensearch)
    backend = OpenSearchBackend.from_settings(settings, dim=dim)
    try:
        yield backend
    finally:
        backend.close()
        client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
        client.indices.delete(index=f"{prefix}-v*", ignore=[404])
        client.close()
