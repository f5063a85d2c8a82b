"""Shared pieces of the benchmarks: machine facts, inputs from ../shared/data, bench models, timing, output.

Inputs are real queries and product titles (qbqtc: Chinese web query → title; homedepot: English
product search). Rerank candidate lists are each query's judged titles followed by the BM25 top titles
of the same corpus, i.e. what a first stage hands the reranker.

Models are random-initialised with the exact architectures of bge-reranker-v2-m3 and bge-large-zh-v1.5
(`tests.support.tiny_models`), saved once under ~/.cache/shopsearch/bench-models (never in the repo).
Their tokenizers are trained locally (no downloads) with the same kind of model as the real ones
(Unigram + Metaspace for XLM-R, WordPiece with per-character CJK splitting for BERT), on the
benchmark corpus itself so that token counts are realistic: the factory's default tokenizers are
trained on ~60 strings and would fold unseen Chinese runs into single <unk> tokens.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import RANDOM_WEIGHTS_NOTE

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SHOPSEARCH_BENCH_DATA", REPO_ROOT.parent / "shared" / "data"))
BENCH_MODELS = Path(os.environ.get("SHOPSEARCH_BENCH_MODELS", Path.home() / ".cache" / "shopsearch" / "bench-models"))
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"

LIBRARIES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "torch",
    "transformers",
    "tokenizers",
    "optimum",
    "optimum-onnx",
    "sentence-transformers",
    "FlagEmbedding",
    "numpy",
)


# ---------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD features that decide GEMM speed (AVX-512, VNNI, AMX)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
                return [f for f in wanted if f in flags]
    return []


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    mem_gb = None
    with contextlib.suppress(ImportError):
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "load_average_at_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls, each processing `items` items."""

    seconds: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)

    def add(self, seconds: float, items: int) -> None:
        self.seconds.append(seconds)
        self.items.append(items)

    def summary(self) -> dict[str, float]:
        s = sorted(self.seconds)
        total_items = sum(self.items)
        return {
            "calls": len(s),
            "items_per_s": total_items / sum(s) if s else float("nan"),
            "latency_median_s": statistics.median(s) if s else float("nan"),
            "latency_min_s": s[0] if s else float("nan"),
            "latency_p90_s": s[min(len(s) - 1, int(0.9 * len(s)))] if s else float("nan"),
        }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------- data


@dataclass
class RerankSet:
    """One query and its candidate titles, judged titles first."""

    dataset: str
    query: str
    docs: list[str]


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_qrels(folder: Path) -> dict[str, list[str]]:
    path = next(iter(sorted(folder.glob("qrels-*.tsv"))))
    judged: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            judged.setdefault(row["query-id"], []).append(row["corpus-id"])
    return judged


_LATIN = re.compile(r"[a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u9fff]+")


def lexical_terms(text: str) -> list[str]:
    """Latin words + CJK character bigrams (unigrams for single characters): enough for a BM25 first stage."""
    text = text.lower()
    terms = _LATIN.findall(text)
    for run in _CJK.findall(text):
        terms.extend([run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)])
    return terms


def corpus_texts(dataset: str) -> tuple[list[str], list[str]]:
    """(titles, queries) of one dataset folder."""
    folder = DATA_DIR / dataset
    titles = [d["title"] for d in _read_jsonl(folder / "corpus.jsonl") if d.get("title")]
    queries = [q["text"] for q in _read_jsonl(folder / "queries.jsonl") if q.get("text")]
    return titles, queries


def rerank_sets(dataset: str, n_queries: int, top_k: int, seed: int = 0) -> list[RerankSet]:
    """`n_queries` sampled queries, each with `top_k` candidates: judged titles, then BM25 top titles."""
    import bm25s

    folder = DATA_DIR / dataset
    corpus = {d["_id"]: d["title"] for d in _read_jsonl(folder / "corpus.jsonl") if d.get("title")}
    queries = {q["_id"]: q["text"] for q in _read_jsonl(folder / "queries.jsonl") if q.get("text")}
    judged = _read_qrels(folder)
    ids = list(corpus)
    retriever = bm25s.BM25()
    retriever.index([lexical_terms(corpus[i]) for i in ids], show_progress=False)
    qids = sorted(q for q in judged if q in queries)
    rng = random.Random(seed)
    rng.shuffle(qids)
    sets: list[RerankSet] = []
    for qid in qids:
        if len(sets) == n_queries:
            break
        terms = lexical_terms(queries[qid])
        if not terms:
            continue
        docs = [corpus[d] for d in judged[qid] if d in corpus][:top_k]
        found, _ = retriever.retrieve([terms], k=min(len(ids), top_k * 2), show_progress=False)
        for index in found[0]:
            if len(docs) == top_k:
                break
            title = corpus[ids[int(index)]]
            if title not in docs:
                docs.append(title)
        if len(docs) == top_k:
            sets.append(RerankSet(dataset, queries[qid], docs))
    return sets


def embed_docs(dataset: str, n_docs: int, seed: int = 0) -> list[str]:
    titles, _ = corpus_texts(dataset)
    return random.Random(seed).sample(titles, n_docs)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    a = np.asarray(lengths)
    return {
        "n": len(a),
        "mean": round(float(a.mean()), 1),
        "p10": float(np.percentile(a, 10)),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
    }


# ---------------------------------------------------------------------------------------- bench models


def _training_texts(limit_per_dataset: int | None) -> list[str]:
    texts: list[str] = []
    for dataset in ("qbqtc", "homedepot"):
        titles, queries = corpus_texts(dataset)
        texts.extend(titles[:limit_per_dataset] + queries[:limit_per_dataset])
    return texts


def train_bert_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """bge/BERT-kind tokenizer (WordPiece, BertNormalizer with per-character CJK splitting)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return tok


@dataclass(frozen=True)
class BenchModels:
    reranker: Path
    embedder: Path
    full_size: bool


def prepare_models(quick: bool, root: Path | None = None) -> BenchModels:
    """Create (once) the reranker and embedder directories the benchmarks load.

    quick: the factory's tiny models (seconds), their tokenizers re-saved under the real models'
    classes. Otherwise the exact full architectures, with tokenizers retrained on the benchmark
    corpus (32k Unigram pieces; WordPiece up to the model's 21,128 entries).
    """
    from tokenizers import Tokenizer

    from tests.support import tiny_models as testing

    root = root or BENCH_MODELS
    if quick:
        rr, emb = root / "tiny-xlmr", root / "tiny-bert"
        make_rr, make_emb = testing.make_tiny_xlmr, partial(testing.make_tiny_bert, pooling="cls")
    else:
        rr, emb = root / "bge-reranker-v2-m3-random", root / "bge-large-zh-v1.5-random"
        make_rr, make_emb = testing.make_full_bge_reranker, testing.make_full_bge_embedder
    marker = "bench-tokenizer.json"
    for model_dir, make, train, save, vocab in (
        (rr, make_rr, testing.unigram_tokenizer, testing.save_xlmr_tokenizer, 32000),
        (emb, make_emb, train_bert_tokenizer, testing.save_bert_tokenizer, testing.BGE_LARGE_ZH_VOCAB),
    ):
        if (model_dir / marker).exists():
            continue
        if not (model_dir / "config.json").exists():
            make(model_dir)
        if quick:
            save(Tokenizer.from_file(str(model_dir / "tokenizer.json")), model_dir)
            origin = "the test-model factory's tokenizer (trained on its ~60 product strings)"
        else:
            save(train(_training_texts(None), vocab), model_dir)
            origin = "trained on qbqtc + homedepot titles and queries"
        (model_dir / marker).write_text(json.dumps({"tokenizer": origin}))
    return BenchModels(rr, emb, full_size=not quick)


# ---------------------------------------------------------------------------------------- output


def write_json(output_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    body = {"note": RANDOM_WEIGHTS_NOTE, "written_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    body.update(payload)
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
