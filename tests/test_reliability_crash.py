"""Crash safety at CI size: `shopsearch index --resume` SIGKILLed twice at seeded points of a 2k-product
catalog (BM25 only, so the run is quick), resumed, then checked against the catalog: nothing lost,
nothing duplicated, every product equal to its last catalog row, the lexical index agreeing with SQLite.
The full run (20k products, 5 kills, tiny model with vector checks, signal updates) is
`python -m benchmarks.reliability`. A second test SIGKILLs `shopsearch force-merge` twice on a 2k-product store."""

from __future__ import annotations

from pathlib import Path

from benchmarks.reliability.crash import index_crash, merge_crash


def test_sigkill_and_resume_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    result = index_crash(tmp_path, n_products=2_000, kills=2, seed=11, embedder="none", batch_size=128)
    assert result["kills"] == 2, result["attempts"]
    assert all(a["checkpoint_after"] < result["catalog_rows"] for a in result["attempts"][:-1])  # killed mid-file
    assert result["final_exit_ok"], result["attempts"][-1]
    assert (result["lost"], result["duplicated"], result["unexpected"], result["fields_mismatched"]) == (0, 0, 0, 0)
    assert result["stored"] == result["expected"] == 2_000
    assert result["lexical_agrees"] and result["text_rows_match"] and result["category_orphans"] == 0
    assert result["vectors_consistent"]  # BM25 only: no vectors anywhere


def test_sigkilled_force_merges_leave_the_index_whole(tmp_path: Path) -> None:
    built = index_crash(tmp_path, n_products=2_000, kills=0, seed=12, embedder="none", batch_size=500)
    assert built["lost"] == 0 and built["lexical_agrees"]
    result = merge_crash(tmp_path, tmp_path / "store-none", kills=2, seed=13)
    assert result["segments_before"] >= 2
    assert result["kills"] == 2, result["attempts"]
    assert all(a["killed"] or a["returncode"] == 0 for a in result["attempts"]), result["attempts"]
    assert result["every_kill_agrees"], result["attempts"]
    assert (result["final_exit_code"], result["final_segments"], result["final_agrees"]) == (0, 1, True)
    # files of the killed merges are gone: the index is the size of a merge never killed
    assert result["final_lexical_bytes"] <= 1.05 * result["never_killed_lexical_bytes"]
