"""Paired significance tests between two modes over the same queries (seeded, hence reproducible)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    mode_a: str
    mode_b: str
    n_queries: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean(a - b)
    p_value: float  # two-sided paired randomisation (sign-flip) test
    ci_low: float  # paired bootstrap percentile interval of mean(a - b)
    ci_high: float
    n_resamples: int
    seed: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def randomisation_test(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value that mean(a - b) = 0: each query's pair of values is swapped at random.

    With few queries scipy enumerates all 2^n swaps exactly instead of sampling.
    """
    a, b = _paired(a, b)
    if np.all(a == b):
        return 1.0
    result = stats.permutation_test(
        (a, b),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        random_state=np.random.default_rng(seed),
        batch=256,  # bounds memory: batch × n_queries floats at a time
    )
    return float(result.pvalue)


def bootstrap_ci(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of mean(a - b), resampling queries with replacement."""
    a, b = _paired(a, b)
    diff = a - b
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap(
        (diff,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(seed),
        batch=256,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(
    metric: str,
    mode_a: str,
    a: np.ndarray,
    mode_b: str,
    b: np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    a, b = _paired(a, b)
    low, high = bootstrap_ci(a, b, n_resamples=n_resamples, seed=seed)
    return PairedComparison(
        metric=metric,
        mode_a=mode_a,
        mode_b=mode_b,
        n_queries=int(a.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float((a - b).mean()),
        p_value=randomisation_test(a, b, n_resamples=n_resamples, seed=seed),
        ci_low=low,
        ci_high=high,
        n_resamples=n_resamples,
        seed=seed,
    )


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired tests need two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError("paired tests need at least two queries")
    return a, b
