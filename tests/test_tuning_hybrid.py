"""Hard negatives from the product's hybrid retrieval, and the listwise reranker losses (tiny models).

Random-init models: rankings carry no meaning; the tests check that hybrid mining draws from the very
list the pipeline serves, and that listwise training builds sane lists, lowers its loss and saves a
model the product loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from middleware.cli import main
from middleware.config import Settings
from middleware.models import Embedder, Reranker
from middleware.tuning.common import TrainingSetupError
from middleware.tuning.data import write_jsonl
from middleware.tuning.negatives import HybridSearcher, MiningConfig, mine_negatives
from tests.support.tiny_models import PRODUCT_CORPUS

DOCS: list[str] = list(PRODUCT_CORPUS)


def _records(n: int) -> list[dict[str, Any]]:
    positives, negatives = DOCS[:n], DOCS[n : n + 24]
    return [
        {
            "query": positives[i][:6],
            "pos": [positives[i]],
            "pos_labels": [1.0],
            "judged": [DOCS[n + 30 + i]],
            "judged_labels": [0.5],
            "neg": [negatives[(i + k) % len(negatives)] for k in range(7)],
        }
        for i in range(n)
    ]


@pytest.fixture()
def store(tmp_path: Path, tiny_mean_embedder_dir: Path) -> tuple[Path, Embedder]:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product

    embedder = Embedder(tiny_mean_embedder_dir, runtime="torch", device="cpu", max_length=64)
    products = [Product(id=f"d{i}", title=t) for i, t in enumerate(DOCS)]
    backend = EmbeddedBackend(tmp_path / "store", dim=embedder.dim)
    try:
        backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    finally:
        backend.close()
    return tmp_path / "store", embedder


def test_hybrid_mining_draws_from_the_served_hybrid_list(store: tuple[Path, Embedder]) -> None:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.pipeline import Pipeline
    from middleware.schema import SearchRequest

    path, embedder = store
    settings = Settings(backend="embedded", data_dir=path, embedder="none", reranker="none")
    pipeline = Pipeline(settings, EmbeddedBackend(path, dim=embedder.dim), embedder)
    try:
        records = [{"query": "drill", "pos": [DOCS[0]], "pos_ids": ["d0"]}, {"query": "hose", "pos": [DOCS[1]]}]
        config = MiningConfig(rank_range=(1, 30), negatives=30, seed=1, dup_threshold=None)
        mined, stats = mine_negatives(records, embedder, HybridSearcher(pipeline, embedder), config)
        for record in mined:
            request = SearchRequest(
                query=record["query"], size=30, retrieval="hybrid", rerank=False, business_enabled=False
            )
            served = [h.id for h in pipeline.search(request).hits]
            assert record["neg_ids"] and set(record["neg_ids"]) <= set(served) - {"d0"}
            # every served hit that is not a positive is a candidate: all of them drawn (negatives=30)
            assert sorted(record["neg_ids"]) == sorted(d for d in served if DOCS[int(d[1:])] not in record["pos"])
        again, _ = mine_negatives(records, embedder, HybridSearcher(pipeline, embedder), config)
        assert again == mined and stats.records == 2
    finally:
        pipeline.close()


def test_cli_hybrid_retriever_needs_the_live_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = tmp_path / "p.jsonl"
    write_jsonl(pairs, _records(2))
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, ({"_id": f"d{i}", "title": t, "text": ""} for i, t in enumerate(DOCS[:5])))
    argv = ["tune", "mine-negatives", "--input", str(pairs), "--corpus", str(corpus), "--output", str(tmp_path / "o")]
    assert main([*argv, "--retriever", "hybrid"]) == 2
    assert "--retriever hybrid" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_listwise_lists_keep_labels_and_negatives() -> None:
    from middleware.tuning.train_reranker import build_lists

    lists = build_lists(_records(3), graded=True, negatives_per_query=7, max_docs=6, seed=0)
    assert len(lists["query"]) == 3
    for docs, labels in zip(lists["docs"], lists["labels"], strict=True):
        assert len(docs) == len(labels) == 6 and labels[:2] == [1.0, 0.5] and labels[2:] == [0.0] * 4
    binary = build_lists(_records(3), graded=False, negatives_per_query=2, max_docs=16, seed=0)
    assert all(labels == [1.0, 0.0, 0.0] for labels in binary["labels"])
    # a query whose documents all share one label has nothing to order: left out
    flat = [{"query": "q", "pos": ["a", "b"], "neg": []}]
    assert build_lists(flat, graded=False, negatives_per_query=3, max_docs=8, seed=0)["query"] == []


@pytest.mark.parametrize("loss", ["lambda", "listnet"])
def test_listwise_training_lowers_loss_and_loads_back(
    loss: str, tiny_embedder_dir: Path, tmp_path: Path, model_cache_dir: Path
) -> None:
    from middleware.tuning.train_reranker import RerankerTrainConfig, train_reranker

    config = RerankerTrainConfig(
        base=str(tiny_embedder_dir),
        loss=loss,  # type: ignore[arg-type]
        labels="graded",
        max_steps=12,
        batch_size=4,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_length=48,
        negatives_per_query=5,
        max_docs_per_query=7,
        save_steps=100,
        logging_steps=1,
        seed=0,
    )
    result = train_reranker(_records(8), tmp_path / "rr", config)
    assert result.steps == 12 and result.rows == 8
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]), result.losses
    manifest = json.loads((tmp_path / "rr" / "shopsearch_tuning.json").read_text())
    assert manifest["loss"] == loss and manifest["rows"] == 8
    reranker = Reranker(tmp_path / "rr", precision="fp32", device="cpu", cache_dir=model_cache_dir)
    assert reranker.score("drill", DOCS[:3]).shape == (3,)


def test_listwise_settings_are_checked() -> None:
    from middleware.tuning.train_reranker import RerankerTrainConfig

    with pytest.raises(TrainingSetupError, match="--loss"):
        RerankerTrainConfig(loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(TrainingSetupError, match="--max-docs-per-query"):
        RerankerTrainConfig(loss="lambda", max_docs_per_query=1)
