"""Smoke run of `python -m benchmarks --quick` on tiny models: the only benchmark part in CI.

Checks that every section runs through the product's own Reranker/Embedder and writes its JSON and
SUMMARY.md; speed figures are never asserted (they are read from the report).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import RANDOM_WEIGHTS_NOTE
from benchmarks.common import DATA_DIR
from benchmarks.padding import padded_tokens
from benchmarks.rerank_bench import Architecture

REPO = Path(__file__).resolve().parents[1]


def test_padded_tokens_counts_batches_padded_to_their_longest() -> None:
    lengths = [3, 10, 4, 9]
    assert padded_tokens(lengths, 2, sort=False) == 2 * 10 + 2 * 9
    assert padded_tokens(lengths, 2, sort=True) == 2 * 10 + 2 * 4
    assert padded_tokens(lengths, 4, sort=False, fixed_width=16) == 64


def test_flops_of_one_sequence_match_the_formula() -> None:
    arch = Architecture(layers=24, hidden=1024, intermediate=4096)
    # 12.6 M parameters per layer: 4 h² + 2 h·i weights plus biases and LayerNorms
    assert arch.layer_parameters == 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
    n = 20
    expected = 2 * 24 * arch.layer_parameters * n + 24 * 4 * 1024 * n * n + 2 * (1024 * 1024 + 2 * 1024 + 1)
    assert arch.flops([n]) == pytest.approx(expected)


def test_lexical_ndcg_uses_linear_gains_over_the_ideal_order() -> None:
    from benchmarks.lexical_analysis import ndcg10

    gains = {"a": 2.0, "b": 1.0, "c": 0.0}
    assert ndcg10(["a", "b", "x"], gains) == pytest.approx(1.0)
    assert ndcg10(["b", "a"], gains) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg10(["x", "c"], gains) == 0.0


def test_bad_section_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "rerank,warp"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "warp" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA_DIR / "qbqtc" / "corpus.jsonl").is_file(),
    reason=f"benchmark inputs come from {DATA_DIR} (../shared/data beside the repo), absent here",
)
def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "SHOPSEARCH_BENCH_MODELS": str(tmp_path / "models")}
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "rerank,gemm,embed,sweep,gpu",
            "--output",
            str(out),
            "--model-cache",
            str(tmp_path / "onnx-cache"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerank = json.loads((out / "rerank.json").read_text())
    assert rerank["note"] == RANDOM_WEIGHTS_NOTE
    runners = rerank["rerank"]["runners"]
    assert {"torch eager FP32", "ours ONNX INT8", "ours ONNX FP32", "sentence-transformers CrossEncoder"} <= set(
        runners
    )
    # the product's FP32 graph computes what PyTorch computes, on every set
    assert runners["ours ONNX FP32"]["top10"]["max_abs_delta_vs_torch_fp32"] < 1e-4
    assert rerank["rerank"]["effective_vs_gemm"]["ours ONNX INT8 top10"]["gemm_gflops"] > 0
    embed = json.loads((out / "embed.json").read_text())["embed"]
    assert embed["runners"]["ours ONNX FP32"]["min_cosine_vs_sentence_transformers"] > 0.999
    sweep = json.loads((out / "sweep.json").read_text())["sweep"]
    assert {r["model"] for r in sweep["rows"]} == {"reranker", "embedder"}
    gpu = json.loads((out / "gpu.json").read_text())["gpu"]
    assert gpu["skipped"] is False or gpu["reason"]
    summary = (out / "SUMMARY.md").read_text()
    assert RANDOM_WEIGHTS_NOTE in summary and "## Targets" in summary
    machine = json.loads((out / "run.json").read_text())["run"]["machine"]
    assert machine["cpu_model"] and machine["libraries"]["onnxruntime"]


def test_business_bench_runs_on_a_tiny_beir_folder(tmp_path: Path) -> None:
    from benchmarks import business_bench

    out = tmp_path / "business.json"
    data = Path(__file__).parent / "data" / "tiny_beir"
    assert business_bench.main([str(data), "--max-queries", "6", "--relevant-min", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["ndcg@10"]) == {"off", "relevance-first", "linear (previous)"}
    assert result["queries"] == 6 and result["ndcg@10_change_vs_off"]["off"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in result["ndcg@10"].values())


def test_lexical_report_replaces_only_its_own_section(tmp_path: Path) -> None:
    from benchmarks.lexical_bench import write_section

    path = tmp_path / "LEXICAL.md"
    write_section(path, "## Speed\n\nfirst\n")
    assert path.read_text() == "# Lexical engine\n\n## Speed\n\nfirst\n"
    path.write_text("# Lexical engine\n\n## Speed\n\nold\n\n### 100k\n\nold table\n\n## Analysis\n\nkept\n")
    write_section(path, "## Speed\n\nnew\n\n### 100k\n\nnew table\n")
    text = path.read_text()
    assert "old" not in text and "new table" in text
    assert text.endswith("## Analysis\n\nkept\n") and text.count("## Speed") == 1


def test_lexical_measure_times_every_query_after_the_warm_up_until_its_cap() -> None:
    from benchmarks.lexical_bench import measure

    calls: list[int] = []

    def fn(i: int) -> int:
        calls.append(i)
        return i

    full = measure(fn, 10, warmup=2, cap_s=60.0)
    assert calls == [0, 1, *range(10)]
    assert full["n"] == 10 and not full["capped"] and full["mean_hits"] == 4.5
    assert 0 <= full["p50_ms"] <= full["p95_ms"] <= full["p99_ms"] <= full["max_ms"]
    capped = measure(fn, 10, warmup=0, cap_s=0.0)
    assert capped["n"] == 1 and capped["capped"] and capped["of"] == 10
