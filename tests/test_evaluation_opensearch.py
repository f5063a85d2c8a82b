"""`shopsearch eval` on the real OpenSearch test node: the same modes and metrics as the embedded store,
through an eval index of its own that is reused while nothing changed and never touches a shop's index."""

from __future__ import annotations

import os
from pathlib import Path

import opensearchpy
import pytest

from middleware.config import OpenSearchSettings
from middleware.evaluation.data import load_beir
from middleware.evaluation.runner import EVAL_INDEX_PREFIX, EvalConfig, Evaluation
from tests.test_opensearch_cluster import KNN_ENGINE, OPENSEARCH_URL, SKIP_REASON

TINY = Path(__file__).parent / "data" / "tiny_beir"
pytestmark = [pytest.mark.opensearch, pytest.mark.skipif(not OPENSEARCH_URL, reason=SKIP_REASON)]


def _run(tmp_path: Path, backend: str, cfg: OpenSearchSettings | None = None) -> dict:
    config = EvalConfig(
        modes=["bm25", "bm25-jieba"],
        pools=["global", "test"],
        workdir=tmp_path / backend,
        n_resamples=50,
        backend=backend,
        opensearch=cfg,
    )
    return Evaluation(load_beir(TINY), config).run()


def test_bm25_on_opensearch_matches_the_embedded_store_and_reuses_its_eval_index(tmp_path: Path) -> None:
    assert OPENSEARCH_URL
    client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
    shop_prefix = f"shop-{os.getpid()}"  # the shop's configured prefix: eval must neither read nor write it
    cfg = OpenSearchSettings(url=OPENSEARCH_URL, knn_engine=KNN_ENGINE, replicas=0, index_prefix=shop_prefix)
    before = set(client.indices.get(index=f"{EVAL_INDEX_PREFIX}*", ignore_unavailable=True).keys())
    try:
        embedded = _run(tmp_path, "embedded")
        cluster = _run(tmp_path, "opensearch", cfg)
        for pool in ("global", "test"):
            ours, theirs = embedded["results"]["bm25"][pool], cluster["results"]["bm25"][pool]
            assert theirs["queries"] == ours["queries"] == 6
            assert theirs["failed_queries"] == 0
            assert abs(theirs["ndcg@10"] - ours["ndcg@10"]) <= 0.05, (pool, theirs, ours)
            # the analyses differ (the embedded store stems English words and splits letters from digits;
            # the cluster's word analyzer does neither), so each finds matches the other misses
            assert abs(theirs["recall@100"] - ours["recall@100"]) <= 0.1, (pool, theirs, ours)
        assert "analysis variant of the embedded store" in cluster["skipped_modes"]["bm25-jieba"]
        assert cluster["settings"]["backend"] == "opensearch"
        assert client.indices.get(index=f"{shop_prefix}*", ignore_unavailable=True) == {}
        eval_indexes = sorted(set(client.indices.get(index=f"{EVAL_INDEX_PREFIX}*").keys()) - before)
        assert len(eval_indexes) == 2  # one per pool
        assert sum(int(client.count(index=i)["count"]) for i in eval_indexes) == 24 + 15

        again = _run(tmp_path, "opensearch", cfg)  # unchanged corpus: searched as it is, not reindexed
        assert sum("reused OpenSearch index" in n for n in again["notes"]) == 2
        assert sorted(set(client.indices.get(index=f"{EVAL_INDEX_PREFIX}*").keys()) - before) == eval_indexes
        for pool in ("global", "test"):
            assert again["results"]["bm25"][pool]["ndcg@10"] == cluster["results"]["bm25"][pool]["ndcg@10"]
    finally:
        created = set(client.indices.get(index=f"{EVAL_INDEX_PREFIX}*", ignore_unavailable=True).keys()) - before
        if created:
            client.indices.delete(index=",".join(sorted(created)))
