"""`plan_batches`: length-sorted batch cuts that minimise padding plus a per-batch overhead."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.models.tokenization import plan_batches


def _cost(lengths: np.ndarray, batches: list[np.ndarray], overhead: int) -> int:
    return sum(len(b) * int(lengths[b].max()) + overhead for b in batches)


def test_none_gives_fixed_chunks_longest_first() -> None:
    lengths = np.array([3, 10, 4, 9, 7])
    assert [b.tolist() for b in plan_batches(lengths, 2, None)] == [[1, 3], [4, 2], [0]]


def test_an_outlier_gets_its_own_batch() -> None:
    lengths = np.array([20] * 31 + [200])
    batches = plan_batches(lengths, 32, 32)
    assert [b.tolist() for b in batches] == [[31], list(range(31))]
    # fixed chunks would pad all 32 rows to 200 tokens
    assert _cost(lengths, batches, 0) == 200 + 31 * 20


def test_empty_and_single() -> None:
    assert plan_batches(np.array([], dtype=np.int64), 4, 32) == []
    assert [b.tolist() for b in plan_batches(np.array([5]), 4, 32)] == [[0]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=512), min_size=1, max_size=120),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=0, max_value=256),
)
def test_plan_is_a_partition_within_limits_never_worse_than_fixed_chunks(
    values: list[int], max_rows: int, overhead: int
) -> None:
    lengths = np.array(values, dtype=np.int64)
    batches = plan_batches(lengths, max_rows, overhead)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(values)))
    assert all(1 <= len(b) <= max_rows for b in batches)
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first across and within batches
    fixed = plan_batches(lengths, max_rows, None)
    assert _cost(lengths, batches, overhead) <= _cost(lengths, fixed, overhead)
