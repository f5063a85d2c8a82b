"""`shopsearch tune fusion` and its library: capture once, fuse in memory, choose on dev, test on held-out.

The embedder is a tiny random-init model (its vector rankings carry no meaning); what the tests check
is that the in-memory fusion is the product's fusion, that the split and the choice are deterministic,
and that the written snippet selects the chosen configuration.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from middleware import fusion
from middleware.cli import main
from middleware.config import Settings
from middleware.evaluation.data import load_beir
from middleware.products import Candidate
from middleware.tuning import fusion as tuning

TINY_BEIR = Path(__file__).parent / "data" / "tiny_beir"


def _random_lists(rng: random.Random) -> tuning.QueryLists:
    ids = [f"d{i:02d}" for i in range(30)]
    bm25 = rng.sample(ids, rng.randint(0, 12))
    knn = rng.sample(ids, rng.randint(0, 12))
    bm25_scores = sorted((round(rng.uniform(0, 20), 1) for _ in bm25), reverse=True)  # ties on purpose
    knn_scores = sorted((round(rng.uniform(0.2, 0.9), 2) for _ in knn), reverse=True)
    threshold = round(rng.uniform(0.3, 0.8), 2) if knn else None
    return tuning.QueryLists(
        list(zip(bm25, bm25_scores, strict=True)), list(zip(knn, knn_scores, strict=True)), threshold
    )


def test_array_scorer_ranks_as_the_product_fusion_functions() -> None:
    rng = random.Random(7)
    captured = {f"q{i}": _random_lists(rng) for i in range(40)}
    qrels = {
        q: {doc: float(rng.randint(0, 3)) for doc, _ in lists.bm25[:3] + lists.knn[:3]} for q, lists in captured.items()
    }
    scorer = tuning.FastScorer(captured, qrels, sorted(captured), gain_mapping="score")
    for config in tuning.default_grid():
        for index, qid in enumerate(scorer.query_ids):
            assert scorer.ranking(index, config, 10) == tuning.fuse_ranking(captured[qid], config, 10), config.label


def test_weighted_rrf_weights_each_list() -> None:
    lists = {"bm25": [Candidate(id="a", bm25=3.0), Candidate(id="b", bm25=2.0)], "knn": [Candidate(id="b", knn=0.9)]}
    plain = fusion.rrf(lists, k=1)
    assert [c.id for c in plain] == ["b", "a"]  # 1/2 + 1/3 against 1/2
    lexical_first = fusion.rrf(lists, k=1, weights={"bm25": 2.0, "knn": 0.1})
    assert [c.id for c in lexical_first] == ["a", "b"]  # 2/2 against 2/3 + 0.1/2
    assert lexical_first[0].fused == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'knn'"):
        fusion.rrf(lists, weights={"knn": -1.0})


def test_split_is_seeded_by_query_and_disjoint() -> None:
    ids = [f"q{i}" for i in range(20)]
    dev, held = tuning.split_queries(ids, 0.5, seed=3)
    assert tuning.split_queries(list(reversed(ids)), 0.5, seed=3) == (dev, held)
    assert not set(dev) & set(held) and sorted(dev + held) == sorted(ids)
    assert tuning.split_queries(ids, 0.5, seed=4) != (dev, held)
    with pytest.raises(ValueError, match="dev fraction"):
        tuning.split_queries(ids, 1.0, seed=0)


def test_choice_keeps_the_current_config_on_ties() -> None:
    current = tuning.FusionConfig("rrf", rrf_k=60)
    other = tuning.FusionConfig("rrf", rrf_k=5)
    scores = {other: np.array([0.5, 0.5]), current: np.array([0.5, 0.5])}
    assert tuning.best_config(scores, [0, 1], current) == current
    scores[other] = np.array([0.6, 0.5])
    assert tuning.best_config(scores, [0, 1], current) == other


def test_snippet_selects_the_chosen_config(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = tuning.FusionConfig("rrf", rrf_k=20, bm25_weight=1.2, knn_weight=0.8, knn_floor=False)
    lines = tuning.settings_snippet(chosen).splitlines()
    for line in lines:
        name, value = line.split("=", 1)
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert tuning.current_config(settings) == tuning.FusionConfig("rrf", rrf_k=20, bm25_weight=1.2, knn_weight=0.8)
    assert (settings.knn_floor.relative, settings.knn_floor.absolute) == (0.0, -1.0)
    body = json.loads(
        tuning.settings_snippet(tuning.FusionConfig("minmax", bm25_weight=0.4, knn_weight=0.6), fmt="json")
    )
    assert body == {"fusion": {"method": "minmax", "bm25_weight": 0.4, "knn_weight": 0.6}}


def test_capture_matches_the_pipeline_hybrid_search(tiny_mean_embedder_dir: Path, tmp_path: Path) -> None:
    """The captured lists fused with the pipeline's settings give the pipeline's own hybrid ranking."""
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.evaluation.pools import build_pool
    from middleware.evaluation.runner import EvalConfig, Evaluation
    from middleware.pipeline import Pipeline
    from middleware.schema import SearchRequest

    dataset = load_beir(TINY_BEIR)
    query_ids = dataset.judged_query_ids()
    embedder = str(tiny_mean_embedder_dir)
    captured = tuning.capture_dataset(dataset, query_ids, embedder=embedder, workdir=tmp_path, n=100)
    assert set(captured) == set(query_ids) and any(c.bm25 for c in captured.values())
    evaluation = Evaluation(
        dataset, EvalConfig(modes=["hybrid-rrf"], pools=["global"], embedder=embedder, workdir=tmp_path)
    )
    evaluation._load_models()
    path, dim = evaluation._open_index(build_pool("global", dataset.corpus, dataset.qrels, query_ids), None)
    for method in ("rrf", "minmax"):
        pipeline = Pipeline(evaluation._settings(), EmbeddedBackend(path, dim=dim), evaluation.embedder)
        config = tuning.current_config(
            pipeline.settings.model_copy(
                update={"fusion": pipeline.settings.fusion.model_copy(update={"method": method})}
            )
        )
        try:
            for qid in query_ids:
                request = SearchRequest(
                    query=dataset.queries[qid],
                    size=10,
                    retrieval="hybrid",
                    fusion=method,
                    rerank=False,
                    business_enabled=False,
                )
                served = [h.id for h in pipeline.search(request).hits]
                assert served == tuning.fuse_ranking(captured[qid], config, 10), (method, qid)
        finally:
            pipeline.close()
    # a second capture of the same queries is read back from the workdir
    assert tuning.capture_dataset(dataset, query_ids, embedder=embedder, workdir=tmp_path, n=100) == captured


def test_cli_tune_fusion_writes_a_deterministic_snippet(
    tiny_mean_embedder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "tune",
        "fusion",
        str(TINY_BEIR),
        "--embedder",
        str(tiny_mean_embedder_dir),
        "--workdir",
        str(tmp_path / "w"),
    ]
    argv += ["--seed", "1", "--resamples", "200"]
    outputs = []
    for run in ("a", "b"):
        snippet, report = tmp_path / f"{run}.env", tmp_path / f"{run}.json"
        assert main([*argv, "--output", str(snippet), "--report", str(report)]) == 0
        outputs.append((snippet.read_text(), json.loads(report.read_text())))
    assert outputs[0] == outputs[1]
    text, report = outputs[0]
    assert text.startswith("SHOPSEARCH_FUSION__METHOD=")
    assert report["queries"]["dev"] + report["queries"]["held_out"] == len(load_beir(TINY_BEIR).judged_query_ids())
    test = report["held_out"]["paired_test"]
    assert test["mode_a"] == report["chosen"]["label"] and test["mode_b"] == report["current"]["label"]
    assert report["dev"]["chosen"] >= report["dev"]["current"]
    assert "held-out nDCG@10" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dev-fraction", "0"], "--dev-fraction"),
        (["--relevant-min", "99"], "at least 4 queries"),
        (["--max-queries", "0"], "--max-queries"),
    ],
)
def test_cli_tune_fusion_bad_input(
    extra: list[str], message: str, tiny_mean_embedder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "tune",
        "fusion",
        str(TINY_BEIR),
        "--embedder",
        str(tiny_mean_embedder_dir),
        "--output",
        str(tmp_path / "s"),
    ]
    assert main([*argv, "--workdir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
