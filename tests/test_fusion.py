import pytest

from middleware import fusion
from middleware.products import Candidate


def ranked(name: str, ids_scores: list[tuple[str, float]]) -> list[Candidate]:
    return [Candidate(id=i, **{name: s}) for i, s in ids_scores]


def test_rrf_sums_reciprocal_ranks_with_k():
    out = fusion.rrf(
        {"bm25": ranked("bm25", [("a", 9), ("b", 5)]), "knn": ranked("knn", [("b", 0.9), ("c", 0.1)])}, k=60
    )
    scores = {c.id: c.fused for c in out}
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["a"] == pytest.approx(1 / 61)
    assert scores["c"] == pytest.approx(1 / 62)
    assert [c.id for c in out] == ["b", "a", "c"]
    b = out[0]
    assert b.bm25 == 5 and b.knn == 0.9 and b.ranks == {"bm25": 2, "knn": 1}


def test_rrf_ties_break_by_id_and_empty_lists():
    out = fusion.rrf({"bm25": ranked("bm25", [("z", 1)]), "knn": ranked("knn", [("a", 1)])})
    assert [c.id for c in out] == ["a", "z"]  # same fused score: deterministic by id
    assert fusion.rrf({"bm25": [], "knn": []}) == []
    assert fusion.rrf({}) == []
    with pytest.raises(ValueError):
        fusion.rrf({"bm25": []}, k=0)


def test_minmax_weights_and_absent_candidates():
    out = fusion.minmax(
        {
            "bm25": ranked("bm25", [("a", 10.0), ("b", 6.0), ("c", 2.0)]),
            "knn": ranked("knn", [("c", 0.8), ("d", 0.4)]),
        },
        {"bm25": 0.3, "knn": 0.7},
    )
    scores = {c.id: c.fused for c in out}
    assert scores["a"] == pytest.approx(0.3)
    assert scores["b"] == pytest.approx(0.3 * 0.5)
    assert scores["c"] == pytest.approx(0.7)  # bm25 min → 0, knn max → 1
    assert scores["d"] == pytest.approx(0.0)
    assert [c.id for c in out] == ["c", "a", "b", "d"]


def test_minmax_single_candidate_and_all_equal_scores_count_fully():
    out = fusion.minmax({"bm25": ranked("bm25", [("a", 3.0)])}, {"bm25": 0.5})
    assert out[0].fused == pytest.approx(0.5)
    out = fusion.minmax({"knn": ranked("knn", [("a", 0.2), ("b", 0.2)])})
    assert [c.fused for c in out] == [1.0, 1.0]
    assert [c.id for c in out] == ["a", "b"]


def test_minmax_rejects_negative_weights_and_handles_empty():
    with pytest.raises(ValueError):
        fusion.minmax({"bm25": ranked("bm25", [("a", 1)])}, {"bm25": -1})
    assert fusion.minmax({"bm25": []}) == []


def test_fusion_does_not_mutate_inputs_and_keeps_products():
    from middleware.products import Product

    p = Product(id="a", title="t")
    bm = [Candidate(id="a", product=p, bm25=1.0)]
    out = fusion.rrf({"bm25": bm, "knn": [Candidate(id="a", knn=0.5)]})
    assert out[0].product is p and bm[0].fused is None and out[0].knn == 0.5
