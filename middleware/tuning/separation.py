"""How far an embedder pushes positives from negatives: the seed's 'mean positive vs mean negative
similarity' figure, on records with `pos` and `neg` (e.g. mined dev pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from middleware.tuning.negatives import Encoder, _normalise_rows


def similarity_separation(encoder: Encoder, records: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """mean cos(query, pos), mean cos(query, neg), their difference, and the share of (pos, neg)
    pairs of the same query ordered correctly (pos above neg)."""
    records = [r for r in records if r.get("neg")]
    if not records:
        raise ValueError("no record has negatives: run `shopsearch tune mine-negatives` first")
    queries = _normalise_rows(encoder.encode_queries([r["query"] for r in records]))
    pos_vecs = _normalise_rows(encoder.encode_documents([t for r in records for t in r["pos"]]))
    neg_vecs = _normalise_rows(encoder.encode_documents([t for r in records for t in r["neg"]]))
    pos_sims: list[np.ndarray] = []
    neg_sims: list[np.ndarray] = []
    p = n = 0
    for i, record in enumerate(records):
        pos_sims.append(pos_vecs[p : p + len(record["pos"])] @ queries[i])
        neg_sims.append(neg_vecs[n : n + len(record["neg"])] @ queries[i])
        p += len(record["pos"])
        n += len(record["neg"])
    ordered = np.concatenate([(ps[:, None] > ns[None, :]).ravel() for ps, ns in zip(pos_sims, neg_sims, strict=True)])
    mean_pos = float(np.concatenate(pos_sims).mean())
    mean_neg = float(np.concatenate(neg_sims).mean())
    return {
        "queries": len(records),
        "mean_pos": round(mean_pos, 4),
        "mean_neg": round(mean_neg, 4),
        "separation": round(mean_pos - mean_neg, 4),
        "pair_accuracy": round(float(ordered.mean()), 4),
    }
