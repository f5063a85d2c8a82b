"""Tokenisation into length-sorted, per-batch padded arrays, safe to share between threads.

The model's tokenizer.json is read with the `tokenizers` library (no transformers, no PyTorch). We
keep private copies of that Rust tokenizer whose truncation/padding settings are fixed once here and
never changed afterwards: Hugging Face tokenizers mutate those settings on every call, which makes
concurrent calls on one tokenizer fail ("Already borrowed").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer, normalizers

from middleware.models.errors import ModelLoadError

# measured by `python -m benchmarks` (sweep section): see benchmarks/results/SUMMARY.md
BATCH_OVERHEAD_TOKENS = 32


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None
    return value if isinstance(value, dict) else {}


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an
    AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _apply_bert_flags(tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """transformers' BertTokenizerFast rebuilds the normalizer when tokenizer_config.json's flags
    disagree with tokenizer.json's; do the same so both give the same ids."""
    if not str(config.get("tokenizer_class", "")).startswith("BertTokenizer") or tokenizer.normalizer is None:
        return
    state = json.loads(tokenizer.normalizer.__getstate__())
    if state.get("type") != "BertNormalizer":
        return
    wanted = {
        "lowercase": config.get("do_lower_case", True),
        "strip_accents": config.get("strip_accents"),
        "handle_chinese_chars": config.get("tokenize_chinese_chars", True),
    }
    if any(state.get(key, value) != value for key, value in wanted.items()):
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=state.get("clean_text", True), **wanted)


def load_fast_tokenizer(model_dir: Path, *, model_name: str, kind: str) -> tuple[str, int]:
    """The model's Rust tokenizer (serialised) and its pad id, read with the `tokenizers` library
    alone from tokenizer.json + tokenizer_config.json, as transformers' fast tokenizer reads them.
    Only a model without tokenizer.json (a slow tokenizer to convert) needs transformers."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return _convert_with_transformers(model_dir, model_name=model_name, kind=kind)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise ModelLoadError(f"cannot load the {kind} '{model_name}': its tokenizer did not load ({err})") from None
    config = _read_json(model_dir / "tokenizer_config.json")
    _apply_bert_flags(tokenizer, config)
    pad_token = _token_content(config.get("pad_token"))
    if pad_token is None:
        pad_token = _token_content(_read_json(model_dir / "special_tokens_map.json").get("pad_token"))
    # undeclared: the defaults of transformers' Bert / (XLM-)RoBERTa tokenizer classes
    candidates = [pad_token] if pad_token is not None else ["[PAD]", "<pad>"]
    pad_id = next((i for i in map(tokenizer.token_to_id, candidates) if i is not None), None)
    return tokenizer.to_str(), int(pad_id) if pad_id is not None else 0


def _convert_with_transformers(model_dir: Path, *, model_name: str, kind: str) -> tuple[str, int]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelLoadError(
            f"cannot load the {kind} '{model_name}': it has no tokenizer.json, and converting its tokenizer "
            "needs transformers (the export extra: pip install 'shopsearch[export]')"
        ) from None
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:
        raise ModelLoadError(f"cannot load the {kind} '{model_name}': its tokenizer did not load ({err})") from None
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ModelLoadError(f"cannot load the {kind} '{model_name}': it has no fast (Rust) tokenizer")
    pad_id = hf_tokenizer.pad_token_id
    return hf_tokenizer.backend_tokenizer.to_str(), int(pad_id) if pad_id is not None else 0


@dataclass(frozen=True)
class TokenizedBatch:
    """One padded batch: `indices` are positions in the caller's input list."""

    indices: np.ndarray  # int64 (batch,)
    input_ids: np.ndarray  # int64 (batch, seq)
    attention_mask: np.ndarray  # int64 (batch, seq)
    token_type_ids: np.ndarray  # int64 (batch, seq)

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        arrays = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }
        return {name: arrays[name] for name in names}


class TextTokenizer:
    # padded-token cost of one extra batch for `plan_batches`; None = fixed chunks of batch_size
    batch_overhead_tokens: int | None = BATCH_OVERHEAD_TOKENS

    def __init__(self, model_dir: Path, *, max_length: int, model_name: str, kind: str) -> None:
        serialized, pad_id = load_fast_tokenizer(model_dir, model_name=model_name, kind=kind)
        self.max_length = max_length
        self.pad_id = pad_id
        self._single = Tokenizer.from_str(serialized)
        self._single.no_padding()
        self._single.enable_truncation(max_length)
        self._raw = Tokenizer.from_str(serialized)
        self._raw.no_padding()
        self._raw.no_truncation()
        self.pair_special_tokens = self._raw.num_special_tokens_to_add(is_pair=True)

    def encode_texts(self, texts: Sequence[str]) -> list[Encoding]:
        """Single texts with special tokens, truncated to max_length."""
        return self._single.encode_batch(list(texts), add_special_tokens=True)

    def encode_pairs(self, query: str, docs: Sequence[str], *, query_max_length: int) -> list[Encoding]:
        """(query, doc) pairs truncated as FlagEmbedding's reranker does: the query alone is cut to
        `query_max_length` tokens, then only the document is cut so the pair fits max_length."""
        query_encoding = self._raw.encode(query, add_special_tokens=False)
        query_encoding.truncate(query_max_length)
        doc_budget = max(self.max_length - len(query_encoding.ids) - self.pair_special_tokens, 0)
        doc_encodings = self._raw.encode_batch(list(docs), add_special_tokens=False)
        pairs = []
        for doc_encoding in doc_encodings:
            doc_encoding.truncate(doc_budget)
            pairs.append(self._raw.post_process(query_encoding, doc_encoding, add_special_tokens=True))
        return pairs

    def batches(self, encodings: Sequence[Encoding], batch_size: int) -> Iterator[TokenizedBatch]:
        """Longest first, each batch padded to its own longest member (not to max_length), at most
        `batch_size` rows; batch boundaries from `plan_batches` (fixed chunks when
        `batch_overhead_tokens` is None)."""
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        for indices in plan_batches(lengths, batch_size, self.batch_overhead_tokens):
            yield self.pad([encodings[i] for i in indices], indices)

    def pad(self, encodings: Sequence[Encoding], indices: np.ndarray | None = None) -> TokenizedBatch:
        """Exactly these encodings as one batch, padded to the longest (a caller that plans its own
        batches, e.g. the server's queue). `indices` default to 0..n-1."""
        if indices is None:
            indices = np.arange(len(encodings), dtype=np.int64)
        width = max((len(e.ids) for e in encodings), default=0)
        input_ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(encodings), width), dtype=np.int64)
        token_type_ids = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            input_ids[row, :n] = encoding.ids
            attention_mask[row, :n] = 1
            token_type_ids[row, :n] = encoding.type_ids
        return TokenizedBatch(indices, input_ids, attention_mask, token_type_ids)


def plan_batches(lengths: np.ndarray, max_rows: int, overhead_tokens: int | None) -> list[np.ndarray]:
    """Cut the length-sorted (longest first) items into consecutive batches of at most `max_rows`.

    None: fixed chunks of `max_rows`. An int: the cut minimising padded tokens + `overhead_tokens`
    per batch (dynamic programming over the sorted lengths), so a few long outliers get a batch of
    their own instead of padding 31 short pairs to their length. The overhead stands for the cost
    of one more, smaller batch (lower matrix-product efficiency, per-call work) in token units;
    benchmarks/ measures the default.
    """
    order = np.argsort(-lengths, kind="stable")
    n = len(order)
    if overhead_tokens is None or n <= 1:
        return [order[start : start + max_rows] for start in range(0, n, max_rows)]
    widths = lengths[order].astype(np.float64)  # non-increasing: a batch's width is its first item's
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        starts = np.arange(max(0, end - max_rows), end)
        costs = best[starts] + overhead_tokens + (end - starts) * widths[starts]
        k = int(np.argmin(costs))
        best[end], cut[end] = costs[k], starts[k]
    bounds: list[tuple[int, int]] = []
    end = n
    while end > 0:
        bounds.append((int(cut[end]), end))
        end = int(cut[end])
    return [order[a:b] for a, b in reversed(bounds)]


def check_texts(texts: object, parameter: str) -> list[str]:
    """A list of strings, or a TypeError naming the parameter (a bare str is a common slip)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{parameter} must be a list of strings, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{parameter}[{position}] must be a string, got {type(text).__name__}")
    return list(texts)
