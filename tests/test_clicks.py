"""Pairs from clicks: skip-above negatives, propensity-corrected scores, evidence thresholds, untrusted
events counted and skipped, and `make-pairs --from-events` feeding the rest of the loop on tiny models."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from middleware.cli import main
from middleware.events.model import Event, QueryRecord
from middleware.tuning.clicks import ClickPairsConfig, click_pairs, estimate_propensities, query_key_id
from middleware.tuning.data import TuningDataError, read_pairs, write_jsonl
from tests.support.tiny_models import PRODUCT_CORPUS

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CATALOG = {f"p{i}": f"product {i}" for i in range(20)}


class Log:
    """A hand-built log: searches (served pages) and the actions on them."""

    def __init__(self) -> None:
        self.records: list[QueryRecord] = []
        self.events: list[Event] = []

    def search(self, query: str, hits: list[str], actions: dict[str, str] | None = None, *, start: int = 0) -> str:
        qid = f"s{len(self.records)}"
        when = T0 + timedelta(seconds=len(self.records))
        self.records.append(QueryRecord(query_id=qid, timestamp=when, query=query, hit_ids=hits, **{"from": start}))
        for object_id, action in (actions or {}).items():
            position = start + hits.index(object_id) + 1
            self.add(qid, object_id, action, position)
        return qid

    def add(self, qid: str, object_id: str, action: str, position: int | None = None) -> None:
        self.events.append(
            Event(query_id=qid, action=action, object_id=object_id, position=position, timestamp=T0)  # type: ignore[arg-type]
        )

    def pairs(self, **config: Any) -> tuple[list[dict[str, Any]], Any]:
        defaults: dict[str, Any] = {"min_query_searches": 1, "min_impressions": 1, "min_position_impressions": 1}
        return click_pairs(self.records, self.events, CATALOG, ClickPairsConfig(**{**defaults, **config}))


def _by_query(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["query"]: r for r in records}


# ------------------------------------------------------------------------------------------ pair extraction


def test_skip_above_negatives_are_what_was_passed_over() -> None:
    log = Log()
    for _ in range(3):
        log.search("drill", ["p0", "p1", "p2", "p3", "p4"], {"p2": "click"})
    records, stats = log.pairs(min_skips=2)
    (record,) = records
    assert record["pos_ids"] == ["p2"] and record["pos"] == ["product 2"]
    assert sorted(record["neg_ids"]) == ["p0", "p1"]  # shown above the click: looked at, passed over
    assert record["query_id"] == query_key_id("drill") and record["judged_ids"] == []
    assert stats.negatives == 2 and stats.positives == 1
    # below the last click nobody may have looked: only the uncorrected variant calls them negatives
    naive, _ = log.pairs(skip_above=False, correction="none")
    assert sorted(naive[0]["neg_ids"]) == ["p0", "p1", "p3", "p4"]
    # fewer skips than asked: no negatives
    records, _ = log.pairs(min_skips=4)
    assert records[0]["neg_ids"] == []


def test_propensities_are_estimated_from_clicks_per_position_and_correct_scores() -> None:
    log = Log()
    # position 1 is clicked in 2 of 4 searches, position 2 in 1 of 4: θ_2 = 0.25 / 0.5
    log.search("saw", ["p0", "p1"], {"p0": "click"})
    log.search("saw", ["p0", "p1"], {"p0": "click"})
    log.search("saw", ["p0", "p1"], {"p1": "click"})
    log.search("saw", ["p0", "p1"])
    ipw, stats = log.pairs(min_skips=1)
    assert stats.ctr_by_position == {1: 0.5, 2: 0.25}
    assert stats.propensities == {1: 1.0, 2: 0.5}
    labels = dict(zip(ipw[0]["pos_ids"], ipw[0]["pos_labels"], strict=True))
    assert labels == {"p0": 0.5, "p1": 0.5}  # one click in four at half the attention ≈ two in four at full
    raw, _ = log.pairs(correction="none", min_skips=1)
    assert dict(zip(raw[0]["pos_ids"], raw[0]["pos_labels"], strict=True)) == {"p0": 0.5, "p1": 0.25}
    coec, _ = log.pairs(correction="coec", positive_min=0.5, min_skips=1)
    # p1: 1 click over 4 × 0.25 expected = 1.0 → label 1 / (1 + 1); p0: 2 over 4 × 0.5
    assert dict(zip(coec[0]["pos_ids"], coec[0]["pos_labels"], strict=True)) == {"p0": 0.5, "p1": 0.5}
    # the threshold acts on the corrected score: p1 passes 0.4 only once corrected
    ipw, _ = log.pairs(positive_min=0.4)
    raw, _ = log.pairs(correction="none", positive_min=0.4)
    assert ipw[0]["pos_ids"] == ["p0", "p1"] and raw[0]["pos_ids"] == ["p0"] and raw[0]["judged_ids"] == ["p1"]


def test_propensities_are_non_increasing_floored_and_need_evidence() -> None:
    config = ClickPairsConfig(min_position_impressions=10, propensity_floor=0.1)
    ctr = {1: 0.4, 2: 0.2, 3: 0.3, 4: 0.0, 5: 0.5}
    shown = {1: 100, 2: 100, 3: 100, 4: 100, 5: 3}
    theta = estimate_propensities(ctr, shown, config)
    assert theta == {1: 1.0, 2: 0.5, 3: 0.5, 4: 0.1, 5: 0.1}  # 3 capped at 2; 4 floored; 5 too few: as 4
    # no reliable position 1: no correction at all rather than a guess
    assert set(estimate_propensities(ctr, {**shown, 1: 3}, config).values()) == {1.0}


def test_purchases_outrank_clicks_and_pages_use_absolute_positions() -> None:
    log = Log()
    for _ in range(3):
        log.search("lamp", ["p5", "p6", "p7"], {"p5": "click", "p7": "purchase"}, start=10)
    records, stats = log.pairs(min_skips=1)
    assert set(stats.ctr_by_position) == {11, 12, 13}
    assert records[0]["pos_ids"] == ["p7", "p5"] and records[0]["neg_ids"] == ["p6"]
    assert records[0]["pos_labels"][0] == 1.0  # a purchase's weight 3, capped at label 1


def test_evidence_thresholds_are_parameters() -> None:
    log = Log()
    for _ in range(3):
        log.search("hose", ["p0", "p1"], {"p1": "click"})
    log.search("rake", ["p2"], {"p2": "click"})  # one search only
    log.search("hose", ["p9", "p1"], {"p1": "click"})  # p9 shown once
    records, stats = log.pairs(min_query_searches=2, min_impressions=2, min_skips=1)
    assert list(_by_query(records)) == ["hose"]
    assert stats.queries == 2 and stats.queries_below_evidence == 1
    assert records[0]["neg_ids"] == ["p0"] and stats.products_below_evidence == 1  # p9 too rarely shown
    # a single deep click is no positive when two engaged searches are asked for
    records, _ = log.pairs(min_query_searches=1, min_clicks=2)
    assert "rake" not in _by_query(records) and _by_query(records)["hose"]["pos_ids"] == ["p1"]
    records, stats = log.pairs(min_query_searches=1, min_impressions=5)
    assert records == [] and stats.queries_without_positive == 2
    with pytest.raises(TuningDataError, match="--min-impressions"):
        ClickPairsConfig(min_impressions=0)
    with pytest.raises(TuningDataError, match="--correction"):
        ClickPairsConfig(correction="magic")  # type: ignore[arg-type]


def test_untrusted_events_are_counted_and_change_nothing() -> None:
    log = Log()
    for _ in range(3):
        log.search("tile", ["p0", "p1", "p2"], {"p1": "click"})
    log.search("", ["p3", "p4"], {"p3": "click"})  # a browse page: no query to learn
    clean, _ = log.pairs(min_skips=1)
    first = log.records[0].query_id
    log.add("nobody-served-this", "p1", "click")
    log.add(first, "p7", "purchase")  # the search never showed p7
    log.add(first, "p2", "click", position=1)  # served at 3: position corrected, event kept
    log.add(first, "p0", "impression", position=1)
    log.records.append(QueryRecord(query_id=first, timestamp=T0, query="tile", hit_ids=["p2"]))
    log.search("tile", ["p0", "ghost"], {"ghost": "click"})  # ghost: not in the catalog
    records, stats = log.pairs(min_skips=1)
    assert stats.untrusted == {
        "unknown_query_id": 1,
        "object_not_served": 1,
        "duplicate_query_id": 1,
        "not_in_catalog": 1,
    }
    assert stats.position_mismatch == 1 and stats.impression_events == 1 and stats.browse_searches == 1
    assert [r["query"] for r in records] == [r["query"] for r in clean] == ["tile"]
    assert "ghost" not in records[0]["pos_ids"] + records[0]["neg_ids"]
    assert records[0]["pos_ids"] == ["p1", "p2"]  # the corrected p2 click counts, at its served position


# ------------------------------------------------------------------------------------------ CLI


DOCS: list[str] = list(PRODUCT_CORPUS)


def _export(root: Path, *, searches: int = 4) -> Path:
    """12 queries; each served page holds the query's own product at position 3 and is clicked there."""
    log = Log()
    for i in range(12):
        page = [f"d{(i + k) % len(DOCS)}" for k in (13, 27, 0, 5, 9, 31)]
        for _ in range(searches):
            log.search(DOCS[i][:8], page, {f"d{i}": "click"})
    src = root / "export"
    src.mkdir()
    write_jsonl(src / "queries.jsonl", (json.loads(r.model_dump_json(by_alias=True)) for r in log.records))
    write_jsonl(src / "events.jsonl", (json.loads(e.model_dump_json()) for e in log.events))
    write_jsonl(root / "corpus.jsonl", ({"_id": f"d{i}", "title": t, "text": ""} for i, t in enumerate(DOCS)))
    return src


def test_cli_from_events_feeds_the_loop(
    tiny_mean_embedder_dir: Path,
    tiny_reranker_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """make-pairs --from-events → train-reranker directly, and → mine-negatives → teacher-scores → train-*."""
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(tmp_path / "model-cache"))
    src = _export(tmp_path)
    pairs = tmp_path / "pairs"
    argv = ["tune", "make-pairs", "--from-events", str(src), "--catalog", str(tmp_path / "corpus.jsonl")]
    assert main([*argv, "--output-dir", str(pairs), "--dev-fraction", "0.25"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 12 and (summary["train_records"], summary["dev_records"]) == (9, 3)
    assert summary["untrusted"] == {k: 0 for k in summary["untrusted"]}
    train = read_pairs(pairs / "train.jsonl")
    assert all(r["pos"] == [DOCS[int(r["pos_ids"][0][1:])]] and len(r["neg"]) == 2 for r in train)
    assert json.loads((pairs / "pairs_summary.json").read_text())["correction"] == "ipw"
    # the skip-above negatives train a reranker as they are
    rr = tmp_path / "rr-clicks"
    argv = ["tune", "train-reranker", "--input", str(pairs / "train.jsonl"), "--output-dir", str(rr)]
    assert main([*argv, "--base", str(tiny_reranker_dir), "--max-steps", "2", "--batch-size", "8"]) == 0
    manifest = json.loads((rr / "shopsearch_tuning.json").read_text())
    assert manifest["steps"] == 2 and manifest["negative_pairs"] == 2 * len(train)
    # and the rest of the loop takes the file unchanged
    mined = tmp_path / "mined.jsonl"
    argv = ["tune", "mine-negatives", "--input", str(pairs / "train.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")]
    argv += ["--output", str(mined), "--embedder", str(tiny_mean_embedder_dir), "--range", "2-30", "--negatives", "4"]
    assert main(argv) == 0
    assert all(len(r["neg"]) == 4 and not set(r["neg_ids"]) & set(r["pos_ids"]) for r in read_pairs(mined))
    scored = tmp_path / "scored.jsonl"
    assert (
        main(
            [
                "tune",
                "teacher-scores",
                "--input",
                str(mined),
                "--output",
                str(scored),
                "--reranker",
                str(tiny_reranker_dir),
            ]
        )
        == 0
    )
    emb = tmp_path / "emb"
    argv = [
        "tune",
        "train-embedder",
        "--input",
        str(scored),
        "--output-dir",
        str(emb),
        "--base",
        str(tiny_mean_embedder_dir),
    ]
    assert main([*argv, "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--group-size", "4"]) == 0
    assert json.loads((emb / "shopsearch_tuning.json").read_text())["loss"] == "contrastive+kd"
    capsys.readouterr()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("both sources", "give either DATA_DIR (BEIR judgments) or --from-events SRC"),
        ("empty folder", "no queries.jsonl or events.jsonl there"),
        ("zero threshold", "--min-impressions must be ≥ 1"),
        ("missing catalog", "--catalog"),
    ],
)
def test_cli_bad_input_exits_2_naming_it(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _export(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    catalog = tmp_path / ("absent.jsonl" if case == "missing catalog" else "corpus.jsonl")
    argv = ["tune", "make-pairs", *([str(tmp_path)] if case == "both sources" else [])]
    argv += ["--from-events", str(empty if case == "empty folder" else src), "--catalog", str(catalog)]
    argv += ["--min-impressions", "0"] if case == "zero threshold" else []
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_malformed_event_names_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _export(tmp_path)
    with (src / "events.jsonl").open("a") as fh:
        fh.write(
            json.dumps({"query_id": "s0", "action": "hover", "object_id": "d0", "timestamp": T0.isoformat()}) + "\n"
        )
    lines = (src / "events.jsonl").read_text().count("\n")
    argv = ["tune", "make-pairs", "--from-events", str(src), "--catalog", str(tmp_path / "corpus.jsonl")]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"events.jsonl:{lines}: field 'action'" in err
    assert not (tmp_path / "out").exists()


def test_harvested_propensities_use_products_seen_at_two_positions() -> None:
    log = Log()
    # "saw": the ranking flips between versions, the same two products take turns at 1 and 2
    for order in (["p0", "p1"], ["p1", "p0"]):
        for clicked in ("top", "top", "second", None):
            hits = list(order)
            action = {hits[0]: "click"} if clicked == "top" else {hits[1]: "click"} if clicked else {}
            log.search("saw", hits, action)
    # "drill": a good product always on top, a bad one always second (relevance confounded with position)
    for _ in range(4):
        log.search("drill", ["p2", "p3"], {"p2": "click"})
    _, ctr = log.pairs(min_skips=1, propensities="ctr")
    _, harvest = log.pairs(min_skips=1)  # the default
    assert ctr.propensities[2] == 0.25  # CTR 2/12 over 8/12: the confounded estimate
    assert harvest.propensities[2] == 0.5  # the swapped products alone: half the clicks at position 2
    # without products at two positions it falls back to the CTR ratio
    only_drill = Log()
    for _ in range(4):
        only_drill.search("drill", ["p2", "p3"], {"p2": "click", "p3": "click"})
        only_drill.search("drill", ["p2", "p3"], {"p2": "click"})
    assert only_drill.pairs(propensities="harvest")[1].propensities == {1: 1.0, 2: 0.5}
    with pytest.raises(TuningDataError, match="--propensities"):
        ClickPairsConfig(propensities="em")  # type: ignore[arg-type]
