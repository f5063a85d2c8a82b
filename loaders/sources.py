"""Catalog sources: JSONL, CSV and Parquet rows from a path or stdin, with their source line numbers.

Every row comes out as a `SourceRow`: its line number (JSONL/CSV: the physical line it starts on;
Parquet: row index + 1), the raw text or row (for dead letters), and either a dict of fields (after the
field mapping) or the reason it could not be parsed. Nothing here validates products: that is
`loaders.validate`. Reading is streaming for every format, so a 10^7-row catalog never sits in memory.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
PARQUET_BATCH_ROWS = 2048
# csv's default 128 KiB field limit is too small for long product descriptions
csv.field_size_limit(16 * 1024 * 1024)


class SourceError(Exception):
    """The source as a whole cannot be read (missing file, unknown format, not Parquet, bad header)."""


@dataclass(slots=True)
class SourceRow:
    line: int  # 1-based physical line (JSONL/CSV) or row index + 1 (Parquet)
    raw: Any  # the raw text (JSONL) or the row as read (CSV/Parquet), for dead letters
    data: dict[str, Any] | None  # fields after mapping; None when the row could not be parsed
    error: str | None = None


def detect_format(path: str, explicit: str | None) -> str:
    """The format named by --format, else by the file extension (stdin defaults to JSONL)."""
    if explicit:
        fmt = explicit.lower()
        if fmt not in FORMATS:
            raise SourceError(f"unknown format {explicit!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    if path == "-":
        return "jsonl"
    name = path.lower().removesuffix(".gz")
    fmt = _EXTENSIONS.get(Path(name).suffix)
    if fmt is None:
        raise SourceError(f"cannot tell the format of {path!r} from its extension: pass --format")
    return fmt


def parse_mapping(spec: str | None, allowed: Iterable[str]) -> dict[str, str]:
    """`title=name,sales=sold_count` → {"title": "name", "sales": "sold_count"} (target ← source column)."""
    if not spec:
        return {}
    allowed_set = set(allowed)
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        target, sep, source = part.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not target or not source:
            raise SourceError(f"bad --map entry {part!r}: expected FIELD=COLUMN, e.g. title=name")
        if target not in allowed_set:
            raise SourceError(f"bad --map entry {part!r}: {target!r} is not one of {', '.join(sorted(allowed_set))}")
        if target in mapping:
            raise SourceError(f"bad --map: field {target!r} mapped twice")
        mapping[target] = source
    return mapping


def apply_mapping(data: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Rename source columns to product fields; a mapped column wins over a same-named one.

    None values are dropped: null (JSON), an empty CSV cell and a Parquet null all mean "absent",
    so optional fields take their defaults instead of failing type checks.
    """
    if mapping:
        data = dict(data)
        for target, source in mapping.items():
            if source in data:
                data[target] = data.pop(source)
    return {k: v for k, v in data.items() if v is not None}


def read_rows(
    path: str,
    fmt: str,
    *,
    encoding: str = "utf-8",
    mapping: dict[str, str] | None = None,
    stdin: BinaryIO | None = None,
) -> Iterator[SourceRow]:
    """Rows of `path` (or stdin for "-"), streaming. Raises SourceError for unreadable sources."""
    mapping = mapping or {}
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SourceError(f"unknown encoding {encoding!r}") from None
    if fmt == "parquet":
        yield from _parquet_rows(path, mapping, stdin)
        return
    with _open_binary(path, stdin) as stream:
        if fmt == "jsonl":
            yield from _jsonl_rows(stream, encoding, mapping)
        elif fmt == "csv":
            yield from _csv_rows(stream, encoding, mapping)
        else:
            raise SourceError(f"unknown format {fmt!r}")


class _open_binary:
    """A binary stream for a path, stdin ("-"), or a gzip file; closes only what it opened."""

    def __init__(self, path: str, stdin: BinaryIO | None) -> None:
        self.path = path
        self.stdin = stdin
        self.stream: BinaryIO | None = None
        self.owned = False

    def __enter__(self) -> BinaryIO:
        if self.path == "-":
            self.stream = self.stdin or sys.stdin.buffer
            return self.stream
        try:
            if self.path.lower().endswith(".gz"):
                import gzip

                self.stream = gzip.open(self.path, "rb")  # type: ignore[assignment]
            else:
                self.stream = open(self.path, "rb")
        except OSError as err:
            raise SourceError(f"cannot read {self.path}: {err.strerror or err}") from None
        self.owned = True
        return self.stream  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        if self.owned and self.stream is not None:
            self.stream.close()


def _decoder_name(encoding: str) -> str:
    # Excel writes a UTF-8 byte-order mark; utf-8-sig strips it and is otherwise plain UTF-8
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _jsonl_rows(stream: BinaryIO, encoding: str, mapping: dict[str, str]) -> Iterator[SourceRow]:
    decoder = _decoder_name(encoding)
    # lines are decoded one at a time so one line of bad bytes is one dead letter, not a crash
    for line_no, raw_bytes in enumerate(stream, start=1):
        try:
            text = raw_bytes.decode(decoder)
        except UnicodeDecodeError as err:
            raw = raw_bytes.decode(decoder, errors="replace").rstrip("\r\n")
            yield SourceRow(line_no, raw, None, f"not valid {encoding} text: {err.reason} at byte {err.start}")
            continue
        if not text.strip():
            continue  # blank lines are skipped silently
        raw = text.rstrip("\r\n")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield SourceRow(line_no, raw, None, f"invalid JSON: {err.msg} at column {err.colno}")
            continue
        except RecursionError:
            yield SourceRow(line_no, raw, None, "invalid JSON: nested too deeply")
            continue
        if not isinstance(value, dict):
            yield SourceRow(line_no, raw, None, f"row must be a JSON object, got {type(value).__name__}")
            continue
        yield SourceRow(line_no, raw, apply_mapping(value, mapping))


def _decoded_lines(stream: BinaryIO, encoding: str, bad_lines: set[int]) -> Iterator[str]:
    decoder = _decoder_name(encoding)
    for line_no, raw_bytes in enumerate(stream, start=1):
        try:
            yield raw_bytes.decode(decoder)
        except UnicodeDecodeError:
            bad_lines.add(line_no)
            yield raw_bytes.decode(decoder, errors="replace")


def _csv_value(column: str, value: str) -> Any:
    if value == "":
        return None  # an empty cell is an absent value
    if column == "attributes" and value.lstrip().startswith("{"):
        with suppress(json.JSONDecodeError):
            return json.loads(value)
    if column == "category" and "|" in value:
        return [c.strip() for c in value.split("|") if c.strip()]
    return value


def _csv_rows(stream: BinaryIO, encoding: str, mapping: dict[str, str]) -> Iterator[SourceRow]:
    bad_lines: set[int] = set()
    reader = csv.reader(_decoded_lines(stream, encoding, bad_lines))
    try:
        header = next(reader)
    except StopIteration:
        return  # an empty file is an empty catalog
    except csv.Error as err:
        raise SourceError(f"CSV header (line 1) is unreadable: {err}") from None
    if bad_lines:
        raise SourceError(f"CSV header (line 1) is not valid {encoding} text: pass the right --encoding")
    header = [h.strip() for h in header]
    if not any(header):
        raise SourceError("CSV header (line 1) is empty")
    reverse = {source: target for target, source in mapping.items()}
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield SourceRow(start, None, None, f"malformed CSV: {err}")
            continue
        if not cells or all(not c.strip() for c in cells):
            continue  # blank lines are skipped silently
        raw = dict(zip(header, cells, strict=False))
        spanned = [n for n in range(start, reader.line_num + 1) if n in bad_lines]
        if spanned:
            yield SourceRow(start, raw, None, f"line {spanned[0]} is not valid {encoding} text (see --encoding)")
            continue
        if len(cells) > len(header):
            yield SourceRow(start, cells, None, f"row has {len(cells)} fields, the header has {len(header)}")
            continue
        data = {col: _csv_value(reverse.get(col, col), val) for col, val in raw.items()}
        yield SourceRow(start, raw, apply_mapping(data, mapping))


def _parquet_rows(path: str, mapping: dict[str, str], stdin: BinaryIO | None) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spooled: str | None = None
    try:
        if path == "-":
            # Parquet needs a seekable file (its footer is at the end): spool stdin to a temp file
            with tempfile.NamedTemporaryFile(prefix="shopsearch-stdin-", suffix=".parquet", delete=False) as tmp:
                shutil.copyfileobj(stdin or sys.stdin.buffer, tmp, 1 << 20)
                spooled = tmp.name
        try:
            parquet = pq.ParquetFile(spooled or path)
        except FileNotFoundError:
            raise SourceError(f"cannot read {path}: no such file") from None
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{path} is not a readable Parquet file: {err}") from None
        row_no = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    row_no += 1
                    yield SourceRow(row_no, row, apply_mapping(row, mapping))
        except pa.ArrowException as err:
            raise SourceError(f"{path}: Parquet data unreadable after row {row_no}: {err}") from None
    finally:
        if spooled:
            with suppress(OSError):
                os.unlink(spooled)
