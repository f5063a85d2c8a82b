"""The tuning loop on tiny models and tiny data: pairs, mining, teacher logits, training, reloading.

Random-init models: rankings carry no meaning, so the tests check the rules (ranges, exclusions,
determinism, raw logits) and the plumbing (loss goes down on the training data, saved models load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from middleware.cli import main
from middleware.models import Embedder, Reranker
from middleware.tuning.common import TrainingSetupError
from middleware.tuning.data import (
    TuningDataError,
    build_pairs,
    load_corpus,
    read_pairs,
    split_by_query,
    write_jsonl,
    write_pairs_build,
)
from middleware.tuning.negatives import CorpusSearcher, MiningConfig, mine_negatives, parse_range
from middleware.tuning.separation import similarity_separation
from middleware.tuning.teacher import add_teacher_scores
from tests.support.tiny_models import PRODUCT_CORPUS

DOCS: list[str] = list(PRODUCT_CORPUS)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BEIR folder: the product corpus, 12 queries with graded 1–3 judgments."""
    root = tmp_path_factory.mktemp("beir")
    write_jsonl(root / "corpus.jsonl", ({"_id": f"d{i}", "title": t, "text": ""} for i, t in enumerate(DOCS)))
    write_jsonl(root / "queries.jsonl", ({"_id": f"q{i}", "text": DOCS[i][:8]} for i in range(12)))
    with (root / "qrels-train.tsv").open("w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for i in range(12):
            fh.write(f"q{i}\td{i}\t3\n")  # relevant
            fh.write(f"q{i}\td{i + 20}\t2\n")  # judged, below a 2.5 threshold
        fh.write("q0\td40\t2.67\n")
        fh.write("q1\td41\t1\n")  # grades span 1–3: labels (grade − 1) / 2
    return root


@pytest.fixture(scope="module")
def embedder(tiny_mean_embedder_dir: Path) -> Embedder:
    return Embedder(tiny_mean_embedder_dir, runtime="torch", device="cpu", max_length=64)


@pytest.fixture(scope="module")
def corpus_searcher(beir_dir: Path, embedder: Embedder) -> CorpusSearcher:
    return CorpusSearcher(load_corpus(beir_dir / "corpus.jsonl"), embedder)


@pytest.fixture(scope="module")
def pairs(beir_dir: Path) -> list[dict[str, Any]]:
    build, *_ = build_pairs(beir_dir, threshold=2.5, dev_fraction=0.0, seed=1)
    return build.train


def _training_records(n: int = 16) -> list[dict[str, Any]]:
    """Easy, consistent groups: each query shares words with its positive; negatives from a pool
    that is never anyone's positive."""
    positives, negatives = DOCS[:n], DOCS[n : n + 24]
    return [
        {
            "query": positives[i][:6],
            "pos": [positives[i]],
            "neg": [negatives[(i + k) % len(negatives)] for k in range(7)],
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------ pairs


def test_split_is_by_query_seeded_and_disjoint() -> None:
    ids = [f"q{i}" for i in range(50)]
    train, dev = split_by_query(ids, 0.2, seed=3)
    assert len(dev) == 10 and not set(train) & set(dev) and sorted(train + dev) == sorted(ids)
    assert split_by_query(list(reversed(ids)), 0.2, seed=3) == (train, dev)  # order-independent
    assert split_by_query(ids, 0.2, seed=4)[1] != dev


def test_build_pairs_threshold_labels_and_files(beir_dir: Path, tmp_path: Path) -> None:
    build, _corpus, queries, qrels = build_pairs(beir_dir, threshold=2.5, dev_fraction=0.25, seed=7)
    assert len(build.train_ids) == 9 and len(build.dev_ids) == 3
    by_id = {r["query_id"]: r for r in build.train + build.dev}
    q0 = by_id["q0"]
    assert q0["pos_ids"] == ["d0", "d40"] and q0["pos"] == [DOCS[0], DOCS[40]]
    assert q0["pos_labels"] == [1.0, 0.835] and q0["judged_ids"] == ["d20"] and q0["judged_labels"] == [0.5]
    summary = write_pairs_build(build, tmp_path, beir_dir, queries, qrels, split="train")
    assert summary["dev_queries"] == 3
    assert (tmp_path / "dev_query_ids.txt").read_text().split() == build.dev_ids
    dev_qrels = (tmp_path / "beir" / "qrels-dev.tsv").read_text().splitlines()[1:]
    assert {line.split("\t")[0] for line in dev_qrels} == set(build.dev_ids)
    assert (tmp_path / "beir" / "corpus.jsonl").read_text() == (beir_dir / "corpus.jsonl").read_text()
    assert read_pairs(tmp_path / "train.jsonl") == build.train


def test_read_pairs_names_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "a", "pos": ["x"]}\n{"query": "b", "pos": "x"}\n')
    with pytest.raises(TuningDataError, match=r"bad.jsonl:2: field 'pos'"):
        read_pairs(path)
    path.write_text('{"query": "a", "pos": ["x"], "neg": ["y"], "neg_scores": [1, 2]}\n')
    with pytest.raises(TuningDataError, match=r":1: field 'neg_scores' has 2 values for 1 texts"):
        read_pairs(path)


# ------------------------------------------------------------------------------------------ mining


def test_mining_respects_range_and_excludes_positives(
    pairs: list[dict[str, Any]], embedder: Embedder, corpus_searcher: CorpusSearcher
) -> None:
    config = MiningConfig(rank_range=(3, 15), negatives=5, seed=0, dup_threshold=None)
    mined, stats = mine_negatives(pairs, embedder, corpus_searcher, config)
    assert len(mined) == len(pairs) and stats.negatives == sum(len(r["neg"]) for r in mined)
    for record in mined:
        ranking = corpus_searcher.search(embedder.encode_queries([record["query"]]), 15)[0]
        window = {h.id for h in ranking[2:15]}  # 1-based ranks 3..15
        assert 0 < len(record["neg"]) <= 5
        assert set(record["neg_ids"]) <= window
        assert not set(record["neg_ids"]) & (set(record["pos_ids"]) | set(record["judged_ids"]))
        assert not set(record["neg"]) & set(record["pos"])
        assert len(set(record["neg"])) == len(record["neg"])
        assert record["neg"] == [DOCS[int(d[1:])] for d in record["neg_ids"]]
        assert record["pos"] == next(p["pos"] for p in pairs if p["query_id"] == record["query_id"])


def test_mining_is_reproducible_and_seeded(
    pairs: list[dict[str, Any]], embedder: Embedder, corpus_searcher: CorpusSearcher
) -> None:
    def run(seed: int) -> list[list[str]]:
        config = MiningConfig(rank_range=(2, 40), negatives=4, seed=seed)
        return [r["neg_ids"] for r in mine_negatives(pairs, embedder, corpus_searcher, config)[0]]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_mining_drops_near_duplicates_and_margin(embedder: Embedder, corpus_searcher: CorpusSearcher) -> None:
    # the positive's own text under another id, and its case/spacing variant, are never negatives
    record = {"query": DOCS[3][:6], "pos": ["  " + DOCS[3].upper() + " "]}
    mined, stats = mine_negatives([record], embedder, corpus_searcher, MiningConfig(rank_range=(1, 60)))
    assert DOCS[3] not in mined[0]["neg"] and stats.excluded["duplicate_text"] == 1
    # cosine ≥ -1 marks every candidate a duplicate: nothing left
    mined, stats = mine_negatives(
        [record], embedder, corpus_searcher, MiningConfig(rank_range=(1, 60), dup_threshold=-1.0)
    )
    assert mined[0]["neg"] == [] and stats.short == 1 and stats.excluded["cosine"] > 0
    # margin: keep only candidates scoring at least `margin` below the positive
    margin = 0.05
    mined, _ = mine_negatives(
        [record], embedder, corpus_searcher, MiningConfig(rank_range=(1, 60), dup_threshold=None, margin=margin)
    )
    query = embedder.encode_queries([record["query"]])[0]
    pos_score = float(embedder.encode_documents(record["pos"])[0] @ query)
    neg_scores = embedder.encode_documents(mined[0]["neg"]) @ query
    assert mined[0]["neg"] and (neg_scores <= pos_score - margin + 1e-6).all()


@pytest.mark.parametrize("bad", ["2", "0-10", "10-2", "a-b"])
def test_bad_range_is_rejected(bad: str) -> None:
    with pytest.raises(TuningDataError, match="--range"):
        MiningConfig(rank_range=parse_range(bad))


# ------------------------------------------------------------------------------------------ teacher


def test_teacher_scores_are_raw_logits(tiny_reranker_dir: Path, model_cache_dir: Path) -> None:
    reranker = Reranker(tiny_reranker_dir, cache_dir=model_cache_dir, precision="fp32", device="cpu")
    records = [{"query": DOCS[0][:6], "pos": [DOCS[0], DOCS[1]], "neg": DOCS[10:15]}]
    scored = add_teacher_scores(records, reranker)
    logits = reranker.score_logits(records[0]["query"], DOCS[0:2] + DOCS[10:15])
    assert scored[0]["pos_scores"] == pytest.approx(logits[:2].tolist(), abs=1e-6)
    assert scored[0]["neg_scores"] == pytest.approx(logits[2:].tolist(), abs=1e-6)
    probs = reranker.score(records[0]["query"], DOCS[0:2] + DOCS[10:15])
    assert not np.allclose(probs, logits, atol=1e-3)  # sigmoid would be a different thing
    assert "pos_probs" not in scored[0]
    with_probs = add_teacher_scores(records, reranker, sigmoid=True)[0]
    assert with_probs["pos_probs"] + with_probs["neg_probs"] == pytest.approx(probs.tolist(), abs=1e-6)


def test_separation_figures(embedder: Embedder) -> None:
    records = _training_records(4)
    figures = similarity_separation(embedder, records)
    assert figures["queries"] == 4
    assert figures["separation"] == pytest.approx(figures["mean_pos"] - figures["mean_neg"], abs=2e-4)
    assert 0.0 <= figures["pair_accuracy"] <= 1.0


# ------------------------------------------------------------------------------------------ training


def _embedder_loss(model_dir: Path, records: list[dict[str, Any]]) -> float:
    """The training loss (InfoNCE, temperature 0.02) of a saved/base model over all the groups."""
    import torch
    from sentence_transformers import SentenceTransformer

    from middleware.tuning.train_embedder import ContrastiveDistillLoss, build_groups

    model = SentenceTransformer(str(model_dir), device="cpu")
    columns, _ = build_groups(records, group_size=8, max_pos_per_query=1, seed=0, with_teacher=False)
    loss = ContrastiveDistillLoss(model, temperature=0.02, contrastive=True, kd_weight=0, teacher_temperature=1)
    texts = [columns["anchor"], columns["positive"], *(columns[f"negative_{j}"] for j in range(1, 8))]
    with torch.no_grad():
        features = [model.tokenize(t) for t in texts]
        return float(loss(features, None))


def test_train_embedder_lowers_loss_and_loads_back(tiny_mean_embedder_dir: Path, tmp_path: Path) -> None:
    from middleware.tuning.train_embedder import EmbedderTrainConfig, train_embedder

    records = _training_records()
    out = tmp_path / "embedder"
    config = EmbedderTrainConfig(
        base=str(tiny_mean_embedder_dir),
        max_steps=12,
        batch_size=8,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        max_length=32,
        save_steps=6,
        logging_steps=1,
        seed=0,
    )
    result = train_embedder(records, out, config)
    assert result.steps == 12 and len(result.losses) == 12
    assert _embedder_loss(out, records) < _embedder_loss(tiny_mean_embedder_dir, records)
    assert (out / "checkpoints" / "checkpoint-12").is_dir()

    loaded = Embedder(out, runtime="torch", device="cpu")
    assert loaded.pooling == "mean" and loaded.dim == 32
    vectors = loaded.encode_queries(["手表", "wireless earbuds"])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()
    manifest = json.loads((out / "shopsearch_tuning.json").read_text())
    assert manifest["pooling"] == "mean" and manifest["group_size"] == 8 and manifest["loss"] == "contrastive"


def test_train_embedder_cls_base_kd_instruction_onnx(
    tiny_embedder_dir: Path, tmp_path: Path, model_cache_dir: Path
) -> None:
    """A plain transformers base (no sentence-transformers files): CLS pooling is built; teacher
    scores switch KD on; the bge-zh query instruction is stored as the query prompt; ONNX export."""
    from middleware.tuning.train_embedder import EmbedderTrainConfig, train_embedder

    records = _training_records(8)
    for record in records:
        record["pos_scores"] = [4.0]
        record["neg_scores"] = [float(-k) for k in range(len(record["neg"]))]
    out = tmp_path / "embedder-cls"
    result = train_embedder(
        records,
        out,
        EmbedderTrainConfig(base=str(tiny_embedder_dir), max_steps=2, batch_size=4, max_length=32, seed=0),
    )
    assert result.steps == 2
    manifest = json.loads((out / "shopsearch_tuning.json").read_text())
    assert manifest["loss"] == "contrastive+kd" and manifest["pooling"] == "cls"
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "为这个句子生成表示以用于检索相关文章："}
    onnx = Embedder(out, runtime="onnx", precision="fp32", device="cpu", cache_dir=model_cache_dir)
    torch_ = Embedder(out, runtime="torch", device="cpu")
    assert onnx.pooling == "cls"
    # the saved prompt is what search uses, whatever the directory is called (regression: it was ignored)
    assert onnx.query_instruction == "为这个句子生成表示以用于检索相关文章："
    texts = ["小米手表", "running shoes"]
    np.testing.assert_allclose(onnx.encode_documents(texts), torch_.encode_documents(texts), atol=1e-4)


def test_train_reranker_lowers_loss_and_loads_back(
    tiny_embedder_dir: Path, tmp_path: Path, model_cache_dir: Path
) -> None:
    from middleware.tuning.train_reranker import RerankerTrainConfig, build_pairs, train_reranker

    records = _training_records(8)
    out = tmp_path / "reranker"
    config = RerankerTrainConfig(
        base=str(tiny_embedder_dir),
        max_steps=16,
        batch_size=16,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_length=48,
        negatives_per_query=3,
        save_steps=100,
        logging_steps=1,
        seed=0,
    )
    result = train_reranker(records, out, config)
    assert result.steps == 16
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < first, result.losses

    reranker = Reranker(out, precision="fp32", device="cpu", cache_dir=model_cache_dir)
    torch_reranker = Reranker(out, runtime="torch", device="cpu")
    columns = build_pairs(records, graded=False, negatives_per_query=3, seed=0)
    query = records[0]["query"]
    docs = [d for q, d in zip(columns["query"], columns["document"], strict=True) if q == query]
    np.testing.assert_allclose(reranker.score_logits(query, docs), torch_reranker.score_logits(query, docs), atol=1e-4)
    assert reranker.score(query, docs).shape == (len(docs),)


def test_fp16_on_cpu_and_resume_without_checkpoint_are_refused(tiny_embedder_dir: Path, tmp_path: Path) -> None:
    from middleware.tuning.train_embedder import EmbedderTrainConfig, train_embedder

    with pytest.raises(TrainingSetupError, match="--fp16 needs a CUDA GPU"):
        train_embedder(_training_records(4), tmp_path, EmbedderTrainConfig(base=str(tiny_embedder_dir), fp16=True))
    with pytest.raises(TrainingSetupError, match="--resume: no checkpoint"):
        train_embedder(_training_records(4), tmp_path, EmbedderTrainConfig(base=str(tiny_embedder_dir), resume=True))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_loop_on_tiny_data(
    beir_dir: Path,
    tiny_mean_embedder_dir: Path,
    tiny_reranker_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """make-pairs → mine-negatives → teacher-scores → train-embedder (KD) → train-reranker."""
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(tmp_path / "model-cache"))
    pairs_dir = tmp_path / "pairs"
    assert main(["tune", "make-pairs", str(beir_dir), "--output-dir", str(pairs_dir), "--threshold", "2.5"]) == 0
    mined = tmp_path / "mined.jsonl"
    argv = ["tune", "mine-negatives", "--input", str(pairs_dir / "train.jsonl"), "--corpus"]
    argv += [str(beir_dir / "corpus.jsonl"), "--output", str(mined), "--embedder", str(tiny_mean_embedder_dir)]
    assert main([*argv, "--range", "2-30", "--negatives", "7", "--seed", "1"]) == 0
    first = mined.read_text(encoding="utf-8")
    assert "手表" in first  # Chinese kept readable, not \\u-escaped
    assert main([*argv, "--range", "2-30", "--negatives", "7", "--seed", "1"]) == 0
    assert mined.read_text(encoding="utf-8") == first
    # a rule that excludes every candidate: the output is written, but the run says so and fails
    capsys.readouterr()
    starved = tmp_path / "starved.jsonl"
    argv_starved = [*argv[:-4], "--output", str(starved), *argv[-2:]]
    assert main([*argv_starved, "--range", "2-30", "--negatives", "7", "--dup-threshold", "-1"]) == 3
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["negatives"] == 0 and summary["records_short_of_negatives"] == summary["records"]
    assert err.startswith(f"shopsearch: {summary['records']} of {summary['records']} records got fewer than 7")
    assert "cosine" in err and err.count("\n") == 1
    assert all(r["neg"] == [] for r in read_pairs(starved))
    scored = tmp_path / "scored.jsonl"
    teacher = ["tune", "teacher-scores", "--input", str(mined), "--output", str(scored)]
    assert main([*teacher, "--reranker", str(tiny_reranker_dir)]) == 0
    assert all("neg_scores" in r and "pos_probs" not in r for r in read_pairs(scored))
    out = tmp_path / "model"
    train = ["tune", "train-embedder", "--input", str(scored), "--output-dir", str(out)]
    train += ["--base", str(tiny_mean_embedder_dir), "--max-steps", "1", "--batch-size", "4", "--max-length", "32"]
    assert main(train) == 0
    manifest = json.loads((out / "shopsearch_tuning.json").read_text())
    assert manifest["steps"] == 1 and manifest["loss"] == "contrastive+kd"
    rr = tmp_path / "reranker"
    train = ["tune", "train-reranker", "--input", str(mined), "--output-dir", str(rr), "--max-length", "32"]
    assert main([*train, "--base", str(tiny_reranker_dir), "--max-steps", "1", "--batch-size", "8"]) == 0
    manifest = json.loads((rr / "shopsearch_tuning.json").read_text())
    assert manifest["labels"] == "graded" and manifest["steps"] == 1
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "mine-negatives", "--input", "{missing}", "--corpus", "c.jsonl", "--output", "o"], "not found"),
        (["tune", "train-embedder", "--input", "{bad}", "--output-dir", "o"], "bad.jsonl:1: invalid JSON"),
        (["tune", "train-embedder", "--input", "{good}", "--output-dir", "o", "--fp16"], "--fp16 needs a CUDA"),
        (["tune", "train-reranker", "--input", "{good}", "--output-dir", "o", "--max-steps", "0"], "--max-steps"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_embedder_dir: Path
) -> None:
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    write_jsonl(tmp_path / "good.jsonl", _training_records(2))
    paths = {"missing": tmp_path / "missing.jsonl", "bad": tmp_path / "bad.jsonl", "good": tmp_path / "good.jsonl"}
    argv = [a.format(**paths) for a in argv]
    if argv[1].startswith("train"):
        argv += ["--base", str(tiny_embedder_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_mining_from_the_live_index_matches_the_corpus_file(
    tmp_path: Path, embedder: Embedder, corpus_searcher: CorpusSearcher, pairs: list[dict[str, Any]]
) -> None:
    """--index: the embedded store (SQLite + faiss) holding the same products gives the same negatives."""
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product
    from middleware.tuning.negatives import IndexSearcher

    products = [Product(id=f"d{i}", title=t) for i, t in enumerate(DOCS)]
    backend = EmbeddedBackend(tmp_path / "store", dim=embedder.dim)
    try:
        backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
        config = MiningConfig(rank_range=(2, 20), negatives=4, seed=3)
        from_index, _ = mine_negatives(pairs[:4], embedder, IndexSearcher(backend, embedder), config)
    finally:
        backend.close()
    from_file, _ = mine_negatives(pairs[:4], embedder, corpus_searcher, config)
    assert [r["neg_ids"] for r in from_index] == [r["neg_ids"] for r in from_file]
