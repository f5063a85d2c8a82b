"""Rerank speed: the product's `Reranker` against PyTorch eager, sentence-transformers CrossEncoder and
FlagEmbedding FlagReranker, on the same weights and the same (query, candidate titles) sets.

Each runner is loaded alone (one multi-GB model in memory at a time), warmed up on a query outside
the timed sets, then called once per set. Agreement is measured against PyTorch eager FP32 on the
same pairs: max |Δ sigmoid score| and top-10 overlap. Effective FLOP/s counts only real tokens:
2 · (encoder parameters without embeddings) · tokens + attention (4 · n² · hidden per layer and
sequence) + the classification head on the first token.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, gemm, padding

log = logging.getLogger(__name__)

ScoreFn = Callable[[str, list[str]], np.ndarray]


# ---------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def from_dir(cls, model_dir: Path) -> Architecture:
        import json

        c = json.loads((model_dir / "config.json").read_text())
        return cls(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"])

    @property
    def layer_parameters(self) -> int:
        h, i = self.hidden, self.intermediate
        # Q, K, V, O with biases; FFN up/down with biases; two LayerNorms
        return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h

    def flops(self, lengths: Sequence[int], *, head: bool = True) -> float:
        """Forward FLOPs over sequences of these real lengths (no padding)."""
        n = np.asarray(lengths, dtype=np.float64)
        dense = 2.0 * self.layers * self.layer_parameters * n.sum()
        attention = self.layers * 4.0 * self.hidden * float((n**2).sum())
        head_flops = 2.0 * (self.hidden * self.hidden + self.hidden + self.hidden + 1) * len(n) if head else 0.0
        return dense + attention + head_flops


# ---------------------------------------------------------------------------------------- runners


@dataclass
class Runner:
    name: str
    family: str  # "ours" or "peer"
    precision: str
    load: Callable[[], ScoreFn]
    note: str = ""


def ours(model_dir: Path, precision: str, *, threads: int, batch_size: int, cache_dir: Path | None) -> ScoreFn:
    from middleware.models import Reranker

    reranker = Reranker(
        model_dir, precision=precision, device="cpu", threads=threads, batch_size=batch_size, cache_dir=cache_dir
    )
    if reranker.precision != precision:
        raise RuntimeError(f"asked for {precision}, the product loaded {reranker.precision}")
    return reranker.score


def torch_eager(model_dir: Path, *, threads: int, batch_size: int = 32) -> ScoreFn:
    """transformers AutoModelForSequenceClassification, FP32, input order, padded per batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def score(query: str, docs: list[str]) -> np.ndarray:
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(docs), batch_size):
                chunk = docs[start : start + batch_size]
                inputs = tokenizer(
                    [query] * len(chunk),
                    chunk,
                    padding=True,
                    truncation="only_second",
                    max_length=512,
                    return_tensors="pt",
                )
                out.append(torch.sigmoid(model(**inputs).logits[:, 0].float()).numpy())
        return np.concatenate(out)

    return score


def cross_encoder(model_dir: Path, *, threads: int) -> ScoreFn:
    """sentence-transformers CrossEncoder with its defaults (batch 32, sigmoid for one label)."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    model = CrossEncoder(str(model_dir), device="cpu", max_length=512)

    def score(query: str, docs: list[str]) -> np.ndarray:
        return np.asarray(model.predict([(query, d) for d in docs], show_progress_bar=False), dtype=np.float32)

    return score


def flag_reranker(model_dir: Path, *, threads: int) -> ScoreFn:
    """FlagEmbedding FlagReranker with its defaults (batch 128, length-sorted), FP32 on the CPU."""
    import torch
    from FlagEmbedding import FlagReranker

    torch.set_num_threads(threads)
    model = FlagReranker(str(model_dir), use_fp16=False, devices="cpu")

    def score(query: str, docs: list[str]) -> np.ndarray:
        return np.asarray(model.compute_score([[query, d] for d in docs], normalize=True), dtype=np.float32)

    return score


def flag_status() -> str | None:
    """None when FlagEmbedding imports, else why not."""
    try:
        import FlagEmbedding  # noqa: F401
    except Exception as err:  # its import pulls datasets/peft/accelerate: any of them can break it
        return (
            f"FlagEmbedding not importable ({type(err).__name__}: {err}); install with "
            "`pip install --no-deps FlagEmbedding==1.4.2 && pip install datasets accelerate peft sentencepiece` "
            "(a plain install upgrades transformers to 5.x, which breaks optimum-onnx)"
        )
    return None


def runners(model_dir: Path, *, threads: int, batch_size: int, cache_dir: Path | None) -> list[Runner]:
    found = [
        Runner("torch eager FP32", "peer", "fp32", lambda: torch_eager(model_dir, threads=threads)),
        Runner(
            "ours ONNX INT8",
            "ours",
            "int8",
            lambda: ours(model_dir, "int8", threads=threads, batch_size=batch_size, cache_dir=cache_dir),
        ),
        Runner(
            "ours ONNX FP32",
            "ours",
            "fp32",
            lambda: ours(model_dir, "fp32", threads=threads, batch_size=batch_size, cache_dir=cache_dir),
        ),
        Runner(
            "sentence-transformers CrossEncoder",
            "peer",
            "fp32",
            lambda: cross_encoder(model_dir, threads=threads),
        ),
    ]
    if flag_status() is None:
        found.append(
            Runner(
                "FlagEmbedding FlagReranker",
                "peer",
                "fp32",
                lambda: flag_reranker(model_dir, threads=threads),
                note="compute_score runs its first batch twice (a batch-size probe) on every call",
            )
        )
    return found


# ---------------------------------------------------------------------------------------- run


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    k = min(k, len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def run(
    models: common.BenchModels,
    *,
    quick: bool,
    threads: int,
    batch_size: int,
    cache_dir: Path | None,
) -> dict[str, Any]:
    from middleware.models.tokenization import TextTokenizer

    model_dir = models.reranker
    arch = Architecture.from_dir(model_dir)
    top_ks = (10,) if quick else (100, 20)
    # (qbqtc, homedepot) sets per top-K: full-size FP32 peers take ~10 s per top-100 call on 2 cores
    per_dataset = {10: (1, 1)} if quick else {100: (2, 1), 20: (2, 2)}
    sets: dict[int, list[common.RerankSet]] = {}
    for k in top_ks:
        sets[k] = []
        for dataset, n in zip(("qbqtc", "homedepot"), per_dataset[k], strict=True):
            sets[k] += common.rerank_sets(dataset, n, k, seed=k)
    # warms every runner up (first-call allocations) and is not timed
    warmup = common.rerank_sets("qbqtc", 1, top_ks[-1], seed=99)[0]

    # token lengths as the product computes them (same tokenizer files for every runner)
    tokenizer = TextTokenizer(model_dir, max_length=512, model_name=str(model_dir), kind="reranker")
    query_max_length = 512 * 3 // 4
    lengths: dict[int, list[list[int]]] = {
        k: [
            [len(e.ids) for e in tokenizer.encode_pairs(s.query, s.docs, query_max_length=query_max_length)]
            for s in sets[k]
        ]
        for k in top_ks
    }
    length_report = {
        f"top{k} {ds}": common.length_stats(
            [n for s, ls in zip(sets[k], lengths[k], strict=True) if s.dataset == ds for n in ls]
        )
        for k in top_ks
        for ds in ("qbqtc", "homedepot")
    }

    results: dict[str, Any] = {}
    reference: dict[tuple[int, int], np.ndarray] = {}
    for runner in runners(model_dir, threads=threads, batch_size=batch_size, cache_dir=cache_dir):
        entry: dict[str, Any] = {"family": runner.family, "precision": runner.precision, "note": runner.note}
        entry["machine_probe_gflops_before"] = gemm.probe(threads)
        entry["load_average_before"] = list(os.getloadavg())
        log.info("rerank: loading %s", runner.name)
        try:
            load_s, score = common.timed(runner.load)
        except Exception as err:  # a peer that fails to load is reported, not fatal
            entry["error"] = f"{type(err).__name__}: {err}"
            results[runner.name] = entry
            log.warning("rerank: %s failed to load: %s", runner.name, err)
            continue
        entry["load_s"] = round(load_s, 2)
        entry["warmup_s"] = round(common.timed(lambda s=score: s(warmup.query, warmup.docs))[0], 3)
        for k in top_ks:
            timing = common.Timing()
            deltas: list[float] = []
            overlaps: list[float] = []
            flops = 0.0
            for i, (s, ls) in enumerate(zip(sets[k], lengths[k], strict=True)):
                seconds, scores = common.timed(lambda s=s, f=score: f(s.query, s.docs))
                timing.add(seconds, len(s.docs))
                flops += arch.flops(ls)
                if runner.name == "torch eager FP32":
                    reference[(k, i)] = scores
                if (k, i) in reference:
                    deltas.append(float(np.max(np.abs(scores - reference[(k, i)]))))
                    overlaps.append(_top_overlap(scores, reference[(k, i)]))
            summary = timing.summary()
            entry[f"top{k}"] = {
                "pairs_per_s": summary["items_per_s"],
                "latency_median_s": summary["latency_median_s"],
                "latency_min_s": summary["latency_min_s"],
                "calls": summary["calls"],
                "effective_gflops": flops / sum(timing.seconds) / 1e9,
                "max_abs_delta_vs_torch_fp32": max(deltas) if deltas else None,
                "top10_overlap_vs_torch_fp32_mean": float(np.mean(overlaps)) if overlaps else None,
                "top10_overlap_vs_torch_fp32_min": float(np.min(overlaps)) if overlaps else None,
            }
        results[runner.name] = entry
        del score
        gc.collect()

    for k in top_ks:
        peers = [
            v[f"top{k}"]["pairs_per_s"]
            for name, v in results.items()
            if v["family"] == "peer" and f"top{k}" in v and name != "torch eager FP32"
        ]
        fastest_peer = max(peers) if peers else None
        for v in results.values():
            if f"top{k}" in v and fastest_peer:
                v[f"top{k}"]["ratio_to_fastest_library_peer"] = v[f"top{k}"]["pairs_per_s"] / fastest_peer

    all_lengths = [n for k in top_ks for ls in lengths[k] for n in ls]
    pad = padding.padding_report(
        tokenizer,
        [(s.query, s.docs) for k in top_ks for s in sets[k]],
        query_max_length=query_max_length,
        batch_size=batch_size,
    )
    return {
        "model_dir": str(model_dir),
        "full_size": models.full_size,
        "architecture": arch.__dict__ | {"layer_parameters": arch.layer_parameters},
        "threads": threads,
        "batch_size": batch_size,
        "top_ks": list(top_ks),
        "sets_per_top_k": {str(k): len(v) for k, v in sets.items()},
        "token_lengths": length_report,
        "mean_pair_tokens": float(np.mean(all_lengths)),
        "fp16": "skipped on the CPU: onnxruntime's CPU provider computes FP16 graphs in FP32 with casts "
        "(never faster); FP16 is measured by the GPU section when a CUDA provider is present",
        "runners": results,
        "padding": pad,
    }


def effective_fraction(rerank: dict[str, Any], gemm_result: dict[str, Any]) -> dict[str, Any]:
    """Effective FLOP/s of our INT8/FP32 runs as a fraction of the same-run GEMM rate at the token
    count of one of our batches (batch_size × mean padded length, nearest measured)."""
    rates = gemm_result["rates"]
    counts = [int(t) for t in gemm_result["token_counts"]]
    batch_tokens = rerank["batch_size"] * rerank["mean_pair_tokens"]
    nearest = str(min(counts, key=lambda t: abs(t - batch_tokens)))
    out: dict[str, Any] = {"batch_tokens": round(batch_tokens), "gemm_tokens_used": int(nearest)}
    for name, runner in rerank["runners"].items():
        if runner["family"] != "ours":
            continue
        limit = rates[f"onnxruntime_{runner['precision']}"][nearest]["gflops_median"]
        for k in rerank["top_ks"]:
            if f"top{k}" in runner:
                eff = runner[f"top{k}"]["effective_gflops"]
                out[f"{name} top{k}"] = {"effective_gflops": eff, "gemm_gflops": limit, "fraction": eff / limit}
    return out
