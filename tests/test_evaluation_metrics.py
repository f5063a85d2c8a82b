"""Metric, pool, significance and data-loading checks against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from middleware.evaluation.data import EvalDataError, load_beir, sample_queries
from middleware.evaluation.metrics import (
    METRIC_NAMES,
    evaluable_queries,
    evaluate_run,
    gain,
    mrr_at_k,
    ndcg_at_k,
    query_metrics,
    rank_by_score,
    recall_at_k,
)
from middleware.evaluation.pools import build_pool, judged_doc_ids
from middleware.evaluation.significance import bootstrap_ci, compare, randomisation_test

TINY = Path(__file__).parent / "data" / "tiny_beir"

# one query, homedepot-style grades: relevant at >= 2.5 are b and e (e never retrieved)
JUDGED = {"b": 3.0, "d": 2.0, "e": 3.0, "f": 1.0}
RANKING = ["a", "b", "c", "d"]


def test_recall_counts_relevant_in_top_k_over_all_relevant() -> None:
    relevant = {"b", "e"}
    assert recall_at_k(RANKING, relevant, 1) == 0.0
    assert recall_at_k(RANKING, relevant, 2) == 0.5
    assert recall_at_k(RANKING, relevant, 100) == 0.5  # e is never found
    assert recall_at_k(["e", "b"], relevant, 2) == 1.0


def test_mrr_is_reciprocal_rank_of_first_relevant_within_k() -> None:
    relevant = {"b", "e"}
    assert mrr_at_k(RANKING, relevant, 1) == 0.0
    assert mrr_at_k(RANKING, relevant, 5) == 0.5
    assert mrr_at_k(["x", "y", "e"], relevant, 2) == 0.0
    assert mrr_at_k(["x", "y", "e"], relevant, 3) == pytest.approx(1 / 3)


def test_ndcg_score_minus_one_gains_by_hand() -> None:
    # gains: b=2, d=1, e=2, f=0; retrieved a(0) b(2) c(0) d(1)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKING, JUDGED, 10, "score-1") == pytest.approx(dcg / idcg)
    assert ndcg_at_k(RANKING, JUDGED, 10, "score-1") == pytest.approx(0.44992, abs=1e-5)


def test_ndcg_exp2_and_raw_score_gains_by_hand() -> None:
    # exp2 gains: b=7, d=3, e=7, f=1
    dcg = 7 / math.log2(3) + 3 / math.log2(5)
    idcg = 7 + 7 / math.log2(3) + 3 / 2 + 1 / math.log2(5)
    assert ndcg_at_k(RANKING, JUDGED, 10, "exp2") == pytest.approx(dcg / idcg)
    # raw score gains: b=3, d=2, e=3, f=1
    dcg = 3 / math.log2(3) + 2 / math.log2(5)
    idcg = 3 + 3 / math.log2(3) + 2 / 2 + 1 / math.log2(5)
    assert ndcg_at_k(RANKING, JUDGED, 10, "score") == pytest.approx(dcg / idcg)


def test_ndcg_cut_at_k_and_perfect_ranking_scores_one() -> None:
    assert ndcg_at_k(["b", "e", "d"], JUDGED, 10, "score-1") == pytest.approx(1.0)
    # at k=1 only position 1 counts, against the ideal's first gain (2)
    assert ndcg_at_k(["d", "b"], JUDGED, 1, "score-1") == pytest.approx(1 / 2)


def test_negative_gains_clamp_to_zero_and_unknown_mapping_is_rejected() -> None:
    assert gain(0.0, "score-1") == 0.0
    assert gain(2.5, "score-1") == 1.5
    assert gain(2.0, "exp2") == 3.0
    with pytest.raises(ValueError, match="unknown gain mapping"):
        gain(1.0, "log")
    # nothing with a positive gain: nDCG is 0, not a division by zero
    assert ndcg_at_k(["x"], {"x": 1.0}, 10, "score-1") == 0.0


def test_ties_break_by_id_ascending() -> None:
    assert rank_by_score({"b": 1.0, "a": 1.0, "c": 2.0, "aa": 1.0}) == ["c", "a", "aa", "b"]
    assert rank_by_score([("z", 0.5), ("y", 0.5)]) == ["y", "z"]


def test_duplicate_ids_in_a_ranking_are_an_error() -> None:
    with pytest.raises(ValueError, match="more than once"):
        recall_at_k(["b", "b"], {"b"}, 10)


def test_queries_without_relevant_documents_are_skipped_and_counted() -> None:
    qrels = {"q1": JUDGED, "q2": {"x": 2.0}, "q3": {"y": 2.5}}
    kept, skipped = evaluable_queries(["q3", "q2", "q1", "q4"], qrels, 2.5)
    assert kept == ["q1", "q3"]
    assert skipped == ["q2", "q4"]  # q4 has no judgments at all

    run = {"q1": RANKING, "q2": ["x"]}  # q3 missing from the run: an empty ranking
    ev = evaluate_run(run, qrels, ["q1", "q2", "q3"], relevant_min=2.5, gain_mapping="score-1")
    assert ev.query_ids == ["q1", "q3"]
    assert ev.skipped_no_relevant == ["q2"]
    assert set(ev.per_query) == set(METRIC_NAMES)
    assert ev.per_query["mrr@10"].tolist() == [0.5, 0.0]
    assert ev.means["recall@5"] == pytest.approx((0.5 + 0.0) / 2)
    single = query_metrics(RANKING, JUDGED, 2.5, "score-1")
    assert ev.per_query["ndcg@10"][0] == pytest.approx(single["ndcg@10"])


def test_relevance_threshold_changes_recall_but_not_ndcg() -> None:
    low = query_metrics(RANKING, JUDGED, 2.0, "score-1")  # relevant: b, d, e
    high = query_metrics(RANKING, JUDGED, 2.5, "score-1")  # relevant: b, e
    assert low["recall@5"] == pytest.approx(2 / 3)
    assert high["recall@5"] == pytest.approx(1 / 2)
    assert low["ndcg@10"] == high["ndcg@10"]


def test_test_pool_is_union_of_judged_documents_in_corpus_order() -> None:
    corpus = ["d1", "d2", "d3", "d4", "d5"]
    qrels = {"q1": {"d4": 1.0, "d2": 0.0}, "q2": {"d2": 2.0, "d5": 1.0}, "q3": {"d1": 3.0}}
    assert judged_doc_ids(qrels, ["q1", "q2"]) == {"d2", "d4", "d5"}
    pool = build_pool("test", corpus, qrels, ["q1", "q2"])
    assert pool.doc_ids == ("d2", "d4", "d5")  # judged 'not relevant' (0) stays in the pool
    assert build_pool("global", corpus, qrels, ["q1"]).doc_ids == tuple(corpus)
    # the fingerprint identifies the set, not the order
    assert pool.fingerprint == build_pool("test", corpus[::-1], qrels, ["q2", "q1"]).fingerprint
    assert pool.fingerprint != build_pool("test", corpus, qrels, ["q1"]).fingerprint
    with pytest.raises(ValueError, match="unknown pool"):
        build_pool("train", corpus, qrels, ["q1"])


def test_randomisation_test_exact_small_case_by_hand() -> None:
    # three queries, a beats b by 1 on each: of the 2^3 swaps only all-kept and all-swapped
    # reach |mean diff| >= 1, so the exact two-sided p-value is 2/8
    a = np.array([1.0, 1.0, 1.0])
    b = np.array([0.0, 0.0, 0.0])
    assert randomisation_test(a, b) == pytest.approx(0.25)
    assert randomisation_test(a, a.copy()) == 1.0


def test_randomisation_test_separates_real_from_null_differences_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    base = rng.random(300)
    better = np.clip(base + 0.05 + rng.normal(0, 0.05, 300), 0, 1)
    noise = np.clip(base + rng.normal(0, 0.05, 300), 0, 1)
    assert randomisation_test(better, base, n_resamples=2000, seed=1) < 0.001
    p_null = randomisation_test(noise, base, n_resamples=2000, seed=1)
    assert p_null > 0.05
    assert randomisation_test(noise, base, n_resamples=2000, seed=1) == p_null
    low, high = bootstrap_ci(better, base, n_resamples=2000, seed=1)
    assert 0.0 < low < (better - base).mean() < high
    result = compare("ndcg@10", "better", better, "base", base, n_resamples=500, seed=3)
    assert result.mean_diff == pytest.approx((better - base).mean())
    assert result.to_dict()["mode_b"] == "base"
    with pytest.raises(ValueError, match="equal length"):
        randomisation_test(better, base[:10])


def test_load_tiny_beir() -> None:
    ds = load_beir(TINY)
    assert ds.split == "test"
    assert len(ds.corpus) == 24
    assert ds.corpus["p23"].to_product().description is None
    assert ds.judged_query_ids() == ["q1", "q2", "q3", "q4", "q5", "q6"]  # q7 has no judgments
    assert ds.qrels["q1"]["p02"] == 2.33
    assert len(ds.fingerprint) == 40


def test_sample_queries_is_seeded_and_sorted() -> None:
    ids = [f"q{i:03d}" for i in range(100)]
    a = sample_queries(ids, 10, seed=1)
    assert a == sorted(a) and len(a) == 10
    assert a == sample_queries(list(reversed(ids)), 10, seed=1)
    assert a != sample_queries(ids, 10, seed=2)
    assert sample_queries(ids, None, seed=1) == ids


def _write(tmp: Path, corpus: str, queries: str, qrels: str, split: str = "test") -> Path:
    (tmp / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    (tmp / "queries.jsonl").write_text(queries, encoding="utf-8")
    (tmp / f"qrels-{split}.tsv").write_text(qrels, encoding="utf-8")
    return tmp


GOOD_CORPUS = json.dumps({"_id": "d1", "title": "drill", "text": ""}) + "\n"
GOOD_QUERIES = json.dumps({"_id": "q1", "text": "drill"}) + "\n"


@pytest.mark.parametrize(
    ("corpus", "queries", "qrels", "message"),
    [
        ('{"_id": "d1", "title": "x"\n', GOOD_QUERIES, "q1\td1\t1\n", r"corpus.jsonl:1: not valid JSON"),
        ('{"title": "x"}\n', GOOD_QUERIES, "q1\td1\t1\n", r"corpus.jsonl:1: missing field _id"),
        (GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"qrels-test.tsv:2: score"),
        (GOOD_CORPUS, GOOD_QUERIES, "q1\td1\n", r"qrels-test.tsv:1: expected query-id"),
        (GOOD_CORPUS + GOOD_CORPUS, GOOD_QUERIES, "q1\td1\t1\n", r"corpus.jsonl:2: duplicate _id d1"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, corpus: str, queries: str, qrels: str, message: str) -> None:
    _write(tmp_path, corpus, queries, qrels)
    with pytest.raises(EvalDataError, match=message):
        load_beir(tmp_path)


def test_missing_split_and_unknown_documents(tmp_path: Path) -> None:
    _write(tmp_path, GOOD_CORPUS, GOOD_QUERIES, "q1\td1\t1\nq1\tgone\t2\n", split="dev")
    with pytest.raises(EvalDataError, match=r"no qrels-test.tsv \(splits found: dev\)"):
        load_beir(tmp_path, "test")
    ds = load_beir(tmp_path)  # the only split
    assert ds.qrels == {"q1": {"d1": 1.0}}
    assert ds.notes == ["1 judgments name documents missing from the corpus and were ignored"]
    with pytest.raises(EvalDataError, match="dataset directory not found"):
        load_beir(tmp_path / "nope")
