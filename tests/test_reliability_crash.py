"""Crash safety at CI size: `shopsearch index --resume` SIGKILLed twice at seeded points of a 2k-product
catalog (BM25 only, so the run is quick), resumed, then checked against the catalog: nothing lost,
nothing duplicated, every product equal to its last catalog row, the lexical index agreeing with SQLite.
The full run (20k products, 5 kills, tiny model with vector checks, signal updates) is
`python -m benchmarks.reliability`."""

from __future__ import annotations

from pathlib import Path

from benchmarks.reliability.crash import index_crash


def test_sigkill_and_resume_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    result = index_crash(tmp_path, n_products=2_000, kills=2, seed=11, embedder="none", batch_size=128)
    assert result["kills"] == 2, result["attempts"]
    assert all(a["checkpoint_after"] < result["catalog_rows"] for a in result["attempts"][:-1])  # killed mid-file
    assert result["final_exit_ok"], result["attempts"][-1]
    assert (result["lost"], result["duplicated"], result["unexpected"], result["fields_mismatched"]) == (0, 0, 0, 0)
    assert result["stored"] == result["expected"] == 2_000
    assert result["lexical_agrees"] and result["text_rows_match"] and result["category_orphans"] == 0
    assert result["vectors_consistent"]  # BM25 only: no vectors anywhere
