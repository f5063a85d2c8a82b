"""The osmem integration suite against a real OpenSearch cluster, plus k-NN and hybrid retrieval.

Runs only when OPENSEARCH_URL is set (e.g. the compose stack: OPENSEARCH_URL=http://localhost:9200).
Each test uses its own index prefix and deletes what it created.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import opensearchpy
import pytest

from middleware.config import Settings
from tests.test_opensearch_osmem import (  # noqa: F401 (backend, loaded: fixtures the suite classes use)
    Target,
    TestReads,
    TestSetup,
    TestVectors,
    TestWrites,
    backend,
    loaded,
    make_settings,
)
from tests.test_opensearch_osmem import TestReindex as _OsmemReindex

OPENSEARCH_URL = os.environ.get("OPENSEARCH_URL")
KNN_ENGINE = os.environ.get("SHOPSEARCH_TEST_KNN_ENGINE", "lucene")
pytestmark = [
    pytest.mark.opensearch,
    pytest.mark.skipif(not OPENSEARCH_URL, reason="set OPENSEARCH_URL to run against a real cluster"),
]

__all__ = ["TestReads", "TestReindex", "TestSetup", "TestVectors", "TestWrites"]


class TestReindex(_OsmemReindex):
    def test_reindex_bm25_only_then_cli(self) -> None:  # type: ignore[override]
        pytest.skip("the CLI test writes the default `products` aliases: it runs on osmem only")


class ClusterTarget(Target):
    knn_skip_reason = None
    pipeline_skip_reason = None


@pytest.fixture
def target() -> type[Target]:
    return ClusterTarget


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"shopsearch-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
    client.indices.delete(index=f"{name}-v*", ignore=[404])
    client.indices.delete_index_template(name=f"{name}-shopsearch", ignore=[404])
    for part in ("settings", "text", "vector"):
        client.cluster.delete_component_template(name=f"{name}-shopsearch-{part}", ignore=[404])
    client.close()


@pytest.fixture
def os_url(prefix: str) -> str:
    return OPENSEARCH_URL or ""


@pytest.fixture
def settings(os_url: str, prefix: str) -> Settings:
    # lucene: the test node's k-NN zip (from Maven Central) has no faiss natives
    return make_settings(os_url, index_prefix=prefix, search_pipeline=f"{prefix}-hybrid", knn_engine=KNN_ENGINE)
