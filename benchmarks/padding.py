"""Padding efficiency: tokens the model computes per real token, for several batching strategies.

"ours" is the product's own batching (`TextTokenizer.batches`: longest first, cut by `plan_batches`
into batches of at most batch_size rows, each padded to its own longest member), fed with the
product's own pair encodings (`TextTokenizer.encode_pairs`, FlagEmbedding-style truncation), i.e.
exactly what `Reranker.score_logits` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def padded_tokens(lengths: Sequence[int], batch_size: int, *, sort: bool, fixed_width: int | None = None) -> int:
    """Tokens computed when `lengths` are cut into batches of `batch_size` (input order or sorted)."""
    a = np.asarray(lengths)
    if sort:
        a = np.sort(a)[::-1]
    total = 0
    for start in range(0, len(a), batch_size):
        chunk = a[start : start + batch_size]
        total += len(chunk) * (fixed_width or int(chunk.max()))
    return total


def product_padded_tokens(tokenizer: Any, encodings: Sequence[Any], batch_size: int) -> int:
    """Tokens computed by the product's own batches (rows × width summed)."""
    return sum(b.input_ids.size for b in tokenizer.batches(encodings, batch_size))


def padding_report(
    tokenizer: Any, sets: Sequence[tuple[str, Sequence[str]]], *, query_max_length: int, batch_size: int
) -> dict[str, Any]:
    """Ratios tokens computed / real tokens summed over all rerank sets (query, docs)."""
    real = ours = sorted_chunks = naive = flag = fixed = 0
    for query, docs in sets:
        encodings = tokenizer.encode_pairs(query, docs, query_max_length=query_max_length)
        lengths = [len(e.ids) for e in encodings]
        real += sum(lengths)
        ours += product_padded_tokens(tokenizer, encodings, batch_size)
        sorted_chunks += padded_tokens(lengths, batch_size, sort=True)
        naive += padded_tokens(lengths, batch_size, sort=False)
        flag += padded_tokens(lengths, 128, sort=True)
        fixed += padded_tokens(lengths, batch_size, sort=False, fixed_width=tokenizer.max_length)
    return {
        "real_tokens": real,
        "batch_size": batch_size,
        "ratios": {
            f"ours (length-sorted, planned cuts, ≤ {batch_size} rows)": ours / real,
            f"length-sorted fixed chunks of {batch_size} (CrossEncoder; ours before)": sorted_chunks / real,
            f"naive (input order, batch {batch_size}, pad to batch longest)": naive / real,
            "FlagReranker default (length-sorted, batch 128)": flag / real,
            f"pad to max_length {tokenizer.max_length}": fixed / real,
        },
    }
