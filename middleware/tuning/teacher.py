"""Teacher scores for distillation: the reranker's RAW logits for every (query, pos/neg) pair.

Raw logits, not sigmoid probabilities: the student's KD target is softmax(teacher scores) over the
group, and sigmoid squeezes scores into (0, 1), which makes that softmax nearly uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class LogitScorer(Protocol):
    def score_logits(self, query: str, docs: Sequence[str]) -> np.ndarray: ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def add_teacher_scores(
    records: Sequence[dict[str, Any]], reranker: LogitScorer, *, sigmoid: bool = False
) -> list[dict[str, Any]]:
    """Records with `pos_scores` / `neg_scores` (logits, floats in input order); with `sigmoid`, also
    `pos_probs` / `neg_probs`."""
    out: list[dict[str, Any]] = []
    for record in records:
        docs = list(record["pos"]) + list(record.get("neg") or [])
        logits = np.asarray(reranker.score_logits(record["query"], docs), dtype=np.float64).reshape(-1)
        n_pos = len(record["pos"])
        new = dict(record)
        new["pos_scores"] = [float(x) for x in logits[:n_pos]]
        new["neg_scores"] = [float(x) for x in logits[n_pos:]]
        if sigmoid:
            probs = _sigmoid(logits)
            new["pos_probs"] = [float(x) for x in probs[:n_pos]]
            new["neg_probs"] = [float(x) for x in probs[n_pos:]]
        else:
            new.pop("pos_probs", None)
            new.pop("neg_probs", None)
        out.append(new)
    return out
