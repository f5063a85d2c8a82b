"""`shopsearch eval` end to end on tiny data: lexical modes, pools, tiny models, bad usage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from middleware.cli import main
from middleware.evaluation.data import load_beir
from middleware.evaluation.runner import EvalConfig, Evaluation

TINY = Path(__file__).parent / "data" / "tiny_beir"


def test_cli_lexical_modes_write_table_json_chart_and_per_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, chart, per_query = tmp_path / "r.json", tmp_path / "c.png", tmp_path / "pq.json"
    code = main(
        [
            "eval",
            str(TINY),
            "--modes",
            "bm25,bm25s-peer,bm25-cjk",
            "--relevant-min",
            "2.5",
            "--workdir",
            str(tmp_path / "work"),
            "--output",
            str(out),
            "--plot",
            str(chart),
            "--per-query",
            str(per_query),
            "--resamples",
            "200",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "5 evaluated, 1 skipped (no judged document with score >= 2.5)" in printed
    assert "global  bm25s-peer" in printed
    results = json.loads(out.read_text())
    assert results["queries"]["evaluated"] == 5
    assert results["queries"]["skipped_no_relevant"] == 1
    assert results["pools"] == {"global": {"documents": 24}, "test": {"documents": 13}}
    cell = results["results"]["bm25"]["test"]
    for name in ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@1", "mrr@5", "mrr@10"):
        assert 0.0 <= cell[name] <= 1.0
    assert cell["latency_ms"]["median"] > 0 and cell["latency_ms"]["p95"] >= cell["latency_ms"]["median"]
    assert cell["failed_queries"] == 0
    # every easy tiny query finds its best product first with our BM25
    assert results["results"]["bm25"]["global"]["mrr@10"] == 1.0
    assert {t["mode_a"] for t in results["significance"]} == {"bm25s-peer", "bm25-cjk"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    values = json.loads(per_query.read_text())
    assert values["bm25"]["global"]["query_ids"] == ["q1", "q2", "q3", "q4", "q5"]
    assert len(values["bm25"]["global"]["ndcg@10"]) == 5

    # the second run reuses the cached indexes and gives the same figures
    assert main(["eval", str(TINY), "--modes", "bm25", "--relevant-min", "2.5", "--workdir",
                 str(tmp_path / "work"), "--output", str(tmp_path / "again.json"), "--quiet"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "again.json").read_text())
    for pool in ("global", "test"):
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            assert again["results"]["bm25"][pool][metric] == results["results"]["bm25"][pool][metric]


def _write_deep_pool_dataset(root: Path) -> Path:
    """150 products match "drill"; the 3 judged ones are long, so BM25 ranks them below 100 globally."""
    root.mkdir()
    with (root / "corpus.jsonl").open("w") as fh:
        for i in range(147):
            fh.write(json.dumps({"_id": f"s{i:03d}", "title": f"drill model {i}", "text": ""}) + "\n")
        filler = " ".join(f"word{j}" for j in range(60))
        for i in range(3):
            fh.write(json.dumps({"_id": f"j{i}", "title": f"drill kit {filler}", "text": filler}) + "\n")
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "drill"}) + "\n")
    (root / "qrels-test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tj0\t2\nq1\tj1\t2\nq1\tj2\t1\n")
    return root


def test_test_pool_is_retrieval_inside_the_pool_not_a_filtered_global_list(tmp_path: Path) -> None:
    dataset = load_beir(_write_deep_pool_dataset(tmp_path / "deep"))
    config = EvalConfig(
        modes=["bm25", "bm25s-peer"], relevant_min=1, gain="score", workdir=tmp_path / "w", n_resamples=50
    )
    results = Evaluation(dataset, config).run()
    assert results["pools"]["test"]["documents"] == 3
    for mode in ("bm25", "bm25s-peer"):
        global_ranking = results["_rankings"][mode]["global"]["q1"]
        test_ranking = results["_rankings"][mode]["test"]["q1"]
        assert len(global_ranking) == 100
        assert not {"j0", "j1", "j2"} & set(global_ranking)  # judged products sit below rank 100
        assert sorted(test_ranking) == ["j0", "j1", "j2"]  # the pool's own retrieval finds them all
        assert results["results"][mode]["global"]["recall@100"] == 0.0
        assert results["results"][mode]["test"]["recall@100"] == 1.0


def test_modes_without_models_are_skipped_with_a_reason(tmp_path: Path) -> None:
    config = EvalConfig(modes=["bm25", "vector", "hybrid+rerank"], relevant_min=2.5, workdir=tmp_path)
    results = Evaluation(load_beir(TINY), config).run()
    assert list(results["results"]) == ["bm25"]
    assert results["skipped_modes"] == {
        "vector": "no embedder given (--embedder)",
        "hybrid+rerank": "no embedder given (--embedder)",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "bm25,telepathy"], "unknown mode(s): telepathy"),
        (["--pools", "everything"], "pools must be among global, test"),
        (["--compare-metrics", "ndcg@11"], "unknown metric(s) to compare: ndcg@11"),
        (["--split", "train"], "no qrels-train.tsv (splits found: test)"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["eval", str(TINY), "--workdir", str(tmp_path), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1


def test_missing_dataset_and_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(TINY), "--max-queries", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_no_evaluable_query_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(TINY), "--modes", "bm25", "--relevant-min", "9", "--workdir", str(tmp_path), "--quiet"])
    assert code == 1
    assert "no query has a judged document with score >= 9" in capsys.readouterr().err


def test_cli_every_mode_with_tiny_models(
    tmp_path: Path,
    tiny_embedder_dir: Path,
    tiny_reranker_dir: Path,
    model_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # random weights: this checks the plumbing of every mode, never quality
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(model_cache_dir))
    out = tmp_path / "r.json"
    modes = "bm25,vector,hybrid-rrf,hybrid-minmax,hybrid+rerank,hybrid+rerank+business,bm25s-peer"
    argv = ["eval", str(TINY), "--modes", modes, "--embedder", str(tiny_embedder_dir)]
    argv += ["--reranker", str(tiny_reranker_dir), "--rerank-k", "5", "--relevant-min", "2.5"]
    argv += ["--workdir", str(tmp_path / "work"), "--output", str(out), "--resamples", "100", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())
    assert results["skipped_modes"] == {}
    assert list(results["results"]) == modes.split(",")
    for mode, cells in results["results"].items():
        for pool in ("global", "test"):
            assert cells[pool]["failed_queries"] == 0, mode
            assert cells[pool]["degraded_queries"] == 0, mode
            assert cells[pool]["queries"] == 5
    stages = results["results"]["hybrid+rerank+business"]["global"]["stage_ms_median"]
    assert {"embed", "retrieve", "fuse", "rerank", "business"} <= set(stages)
    assert "rerank" not in results["results"]["hybrid-rrf"]["global"]["stage_ms_median"]
    assert results["settings"]["embedder_id"] and results["settings"]["reranker_id"]
    assert results["settings"]["rerank_k"] == 5
    # the document vectors were cached for the next run
    assert list((tmp_path / "work" / "vectors").glob("*.npy"))


def _write_binary_label_dataset(root: Path) -> Path:
    """Binary BEIR labels (1 = relevant), as most public sets have them."""
    root.mkdir()
    docs = {"d1": "red leather wallet", "d2": "steel chef knife", "d3": "wool winter scarf", "d4": "garden hose"}
    with (root / "corpus.jsonl").open("w") as fh:
        for doc_id, title in docs.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": ""}) + "\n")
    queries = {"q1": "wallet", "q2": "knife", "q3": "scarf"}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (root / "qrels-test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    return root


def test_default_gain_scores_binary_labels_and_score_minus_1_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_binary_label_dataset(tmp_path / "binary")
    base = ["eval", str(data), "--modes", "bm25", "--pools", "global", "--workdir", str(tmp_path / "w"), "--quiet"]
    assert main([*base, "--output", str(tmp_path / "default.json")]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    default = json.loads((tmp_path / "default.json").read_text())
    assert default["settings"]["gain"] == "score"
    assert default["results"]["bm25"]["global"]["ndcg@10"] == 1.0  # each query's one relevant product first
    assert default["warnings"] == []

    assert main([*base, "--gain", "score-1", "--output", str(tmp_path / "minus1.json")]) == 0
    err = capsys.readouterr().err
    assert "shopsearch: warning: gain 'score-1' gives every judged document of 3 of 3 queries zero gain" in err
    assert "--gain score" in err
    minus1 = json.loads((tmp_path / "minus1.json").read_text())
    assert minus1["results"]["bm25"]["global"]["ndcg@10"] == 0.0
    assert minus1["results"]["bm25"]["global"]["mrr@10"] == 1.0


def test_score_minus_1_on_a_1_to_3_scale_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(TINY), "--modes", "bm25", "--pools", "global", "--gain", "score-1",
                 "--relevant-min", "2.5", "--workdir", str(tmp_path), "--quiet"])  # fmt: skip
    assert code == 0
    assert "warning" not in capsys.readouterr().err
