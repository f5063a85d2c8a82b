"""Sources, validation, dead letters and checkpoints: no model, no backend."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loaders.checkpoint import Checkpoint, atomic_write_json, source_fingerprint
from loaders.sources import SourceError, detect_format, parse_mapping, read_rows
from loaders.validate import DeadLetters, Rejection, validate_product, validate_signal
from middleware.products import Product

BAD_CATALOG_LINES = [
    '{"id": "p1", "title": "小众设计师珐琅手表", "price": "899.00", "sales": 12, "stock": 3}',  # 1 ok
    "",  # 2 blank: skipped silently
    '{"id": "p2", "title": "bad json"',  # 3 bad JSON
    '{"title": "no id"}',  # 4 missing id
    '{"id": "p5", "title": "   "}',  # 5 empty title
    '{"id": "p6", "title": "neg price", "price": -1}',  # 6 negative price
    '{"id": "p7", "title": "neg stock", "stock": -2}',  # 7 negative stock
    '{"id": "p8", "title": "neg sales", "sales": -5}',  # 8 negative sales
    '{"id": "p9", "title": "fractional stock", "stock": 2.5}',  # 9 fractional stock
    '{"id": "p10", "title": "nan price", "price": NaN}',  # 10 NaN
    '{"id": "p11", "title": "wrong type", "attributes": "not an object"}',  # 11 wrong type
    '["not", "an", "object"]',  # 12 not an object
    '{"id": "", "title": "empty id"}',  # 13 empty id
    "   ",  # 14 whitespace only: skipped
    '{"id": 14, "title": "欧米茄 Omega 女士 18K 金 机械手表", "category": "手表"}',  # 15 ok (int id)
]
EXPECTED_REJECTS = {
    3: "invalid JSON",
    4: "id: Field required",
    5: "title",
    6: "price",
    7: "stock",
    8: "sales",
    9: "stock",
    10: "price",
    11: "attributes",
    12: "JSON object",
    13: "id",
}


def _validated(path: Path, fmt: str, **kw: object) -> tuple[list[Product], list[Rejection]]:
    good, bad = [], []
    for row in read_rows(str(path), fmt, **kw):  # type: ignore[arg-type]
        result = validate_product(row)
        (bad if isinstance(result, Rejection) else good).append(result)
    return good, bad


def test_every_kind_of_bad_jsonl_row_is_rejected_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(BAD_CATALOG_LINES) + "\n", encoding="utf-8")
    good, bad = _validated(path, "jsonl")
    assert [p.id for p in good] == ["p1", "14"]
    assert good[0].price == 899.0 and good[1].category == ["手表"]
    assert {r.line for r in bad} == set(EXPECTED_REJECTS)
    for rejection in bad:
        assert EXPECTED_REJECTS[rejection.line] in rejection.reason, rejection
        assert rejection.raw == BAD_CATALOG_LINES[rejection.line - 1]  # the raw text, verbatim


def test_invalid_utf8_line_is_one_reject_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "title": "ok"}\n{"id": "b", "title": "\xff\xfe"}\n{"id": "c", "title": "ok"}\n')
    good, bad = _validated(path, "jsonl")
    assert [p.id for p in good] == ["a", "c"]
    assert [r.line for r in bad] == [2] and "utf-8" in bad[0].reason


def test_csv_with_mapping_multiline_field_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "sku,name,sold_count,price,stock,category,attributes\n"
        'a1,卡西欧 G-SHOCK,10,799,,手表|运动,"{""color"": ""black""}"\n'
        "\n"
        'a2,"两行\n描述",3,,5,,\n'
        "a3,,1,1,1,,\n"  # empty title
        "a4,负价格,1,-3,1,,\n"
        "a5,too,many,fields,1,2,3,4\n"
        "a6,华为手环,1.0,199,0,,\n",
        encoding="utf-8",
    )
    mapping = parse_mapping("id=sku,title=name,sales=sold_count", Product.model_fields)
    good, bad = _validated(path, "csv", mapping=mapping)
    assert [p.id for p in good] == ["a1", "a2", "a6"]
    assert good[0].category == ["手表", "运动"] and good[0].attributes == {"color": "black"}
    assert good[0].stock is None and good[0].sales == 10  # empty cell → absent
    assert good[1].title == "两行\n描述" and good[1].price is None
    assert good[2].sales == 1 and good[2].stock == 0
    assert {r.line: r.reason.split(":")[0] for r in bad} == {
        6: "title",
        7: "price",
        8: "row has 8 fields, the header has 7",
    }
    assert bad[0].raw["sku"] == "a3"  # the row as read, before mapping


def test_gbk_csv_needs_and_honours_encoding(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes("id,title,price\ng1,天梭男士机械表,2999\ng2,小米手表,899\n".encode("gbk"))
    good, bad = _validated(path, "csv", encoding="gbk")
    assert [p.title for p in good] == ["天梭男士机械表", "小米手表"] and not bad
    header = tmp_path / "gbk-header.csv"
    header.write_bytes("编号,标题\ng1,天梭\n".encode("gbk"))
    with pytest.raises(SourceError, match="--encoding"):
        _validated(header, "csv")  # a header that is not UTF-8: the whole file is unreadable


def test_gbk_body_read_as_utf8_rejects_rows_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes(b"id,title\n" + "g1,天梭\n".encode("gbk") + b"g2,ascii title\n")
    good, bad = _validated(path, "csv")
    assert [p.id for p in good] == ["g2"]
    assert bad[0].line == 2 and "--encoding" in bad[0].reason


def test_parquet_rows_stream_in_batches_with_row_numbers(tmp_path: Path) -> None:
    n = 5000  # more than one record batch
    table = pa.table(
        {
            "id": [f"q{i}" for i in range(n)],
            "name": [f"商品 {i}" if i != 7 else None for i in range(n)],
            "price": [float(i) if i != 9 else float("nan") for i in range(n)],
            "sales": [i for i in range(n)],
            "category": [["手表", "礼物"]] * n,
        }
    )
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=1000)
    good, bad = _validated(path, "parquet", mapping={"title": "name"})
    assert len(good) == n - 2
    assert {r.line: r.reason.split(":")[0] for r in bad} == {8: "title", 10: "price"}
    assert good[0].category == ["手表", "礼物"] and good[-1].id == f"q{n - 1}"


def test_stdin_jsonl_and_parquet(tmp_path: Path) -> None:
    jsonl = b'{"id": "s1", "title": "from stdin"}\n\n{"id": "s2", "title": "again"}\n'
    rows = list(read_rows("-", "jsonl", stdin=io.BytesIO(jsonl)))
    assert [(r.line, r.data["id"]) for r in rows] == [(1, "s1"), (3, "s2")]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "title": ["parquet on stdin"]}), buffer)
    buffer.seek(0)
    rows = list(read_rows("-", "parquet", stdin=buffer))
    assert rows[0].data == {"id": "x", "title": "parquet on stdin"}


def test_format_detection_and_mapping_errors(tmp_path: Path) -> None:
    assert detect_format("a.JSONL", None) == "jsonl"
    assert detect_format("a.csv.gz", None) == "csv"
    assert detect_format("-", None) == "jsonl"
    assert detect_format("a.txt", "parquet") == "parquet"
    with pytest.raises(SourceError, match="--format"):
        detect_format("a.txt", None)
    with pytest.raises(SourceError, match="unknown format"):
        detect_format("a.txt", "xml")
    with pytest.raises(SourceError, match="not one of"):
        parse_mapping("titel=name", Product.model_fields)
    with pytest.raises(SourceError, match="FIELD=COLUMN"):
        parse_mapping("title", Product.model_fields)
    with pytest.raises(SourceError, match="cannot read"):
        list(read_rows(str(tmp_path / "missing.jsonl"), "jsonl"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet"):
        list(read_rows(str(tmp_path / "x.parquet"), "parquet"))
    with pytest.raises(SourceError, match="unknown encoding"):
        list(read_rows(str(tmp_path / "x.parquet"), "csv", encoding="klingon"))


def test_mapped_column_wins_and_nulls_mean_absent(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "m", "title": "old", "name": "new", "sales": null}\n', encoding="utf-8")
    good, bad = _validated(path, "jsonl", mapping={"title": "name"})
    assert good[0].title == "new" and good[0].sales == 0 and not bad


def test_signal_rows_validate() -> None:
    from loaders.sources import SourceRow

    assert validate_signal(SourceRow(1, "", {"id": "a", "stock": "3"})).stock == 3  # type: ignore[union-attr]
    rejected = validate_signal(SourceRow(2, "", {"id": "a"}))
    assert isinstance(rejected, Rejection) and "at least one of price, sales, stock" in rejected.reason


def test_dead_letters_file_is_created_lazily_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "dl" / "x.jsonl"
    letters = DeadLetters(path)
    letters.write([])
    assert not path.exists()
    letters.write([Rejection(3, {"a": float("nan")}, "price: bad")])
    letters.close()
    DeadLetters(path).write([Rejection(4, "raw 文本", "why")])
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"line": 3, "raw": {"a": "nan"}, "reason": "price: bad"},  # strict JSON: NaN written as a string
        {"line": 4, "raw": "raw 文本", "reason": "why"},
    ]


def test_checkpoint_is_atomic_and_keyed_by_file_identity(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text("{}\n")
    checkpoint = Checkpoint(tmp_path / "checkpoints", str(source))
    assert checkpoint.load() is None
    checkpoint.save({"last_line": 7, "counts": {"read": 7}})
    assert checkpoint.load()["last_line"] == 7  # type: ignore[index]
    assert not [p for p in checkpoint.path.parent.iterdir() if p.name.endswith(".tmp")]
    before = source_fingerprint(str(source))
    source.write_text("{}\n{}\n")  # a different file (size changes) gets a different checkpoint
    assert source_fingerprint(str(source)) != before
    checkpoint.path.write_text("{torn")
    assert checkpoint.load() is None  # unreadable → start over, never crash
    checkpoint.clear()
    assert not checkpoint.path.exists()
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert os.listdir(tmp_path).count("a.json") == 1


def test_dead_letters_drop_records_past_the_resume_line(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    letters = DeadLetters(path)
    letters.write([Rejection(3, "a", "x"), Rejection(9, "b", "y"), Rejection(12, "c", "z")])
    letters.close()
    resumed = DeadLetters(path)
    resumed.drop_after(9)
    resumed.write([Rejection(12, "c", "z")])
    resumed.close()
    assert [json.loads(line)["line"] for line in path.read_text().splitlines()] == [3, 9, 12]


def test_progress_logs_plain_lines_off_a_terminal_and_summary_reads_well() -> None:
    from loaders.report import Progress, Summary

    stream = io.StringIO()
    progress = Progress("indexing", stream=stream, every_s=0.0)
    progress.update(512, indexed=500, rejected=12)
    progress.update(100)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("indexing: 512 rows (") and "rejected 12" in lines[0]
    assert lines[1].startswith("indexing: 612 rows")
    quiet = io.StringIO()
    Progress("x", stream=quiet, every_s=3600).update(5)
    assert quiet.getvalue() == ""  # off a terminal, at most one line per interval
    summary = Summary(read=10, indexed=7, rejected=3, dead_letter_path="d.jsonl")
    summary.finish(2.0)
    assert summary.docs_per_second == 5.0
    assert summary.lines()[0].startswith("read 10, indexed 7, updated 0, unchanged 0, rejected 3 in 2.0 s")
    assert summary.lines()[-1] == "rejected rows written to d.jsonl"
