"""Row validation through the Product / SignalUpdate models, and the dead-letter file for rejects."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from loaders.sources import SourceRow
from middleware.products import Product, SignalUpdate, describe_validation_error


@dataclass(slots=True)
class Rejection:
    line: int
    raw: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "raw": self.raw, "reason": self.reason}


def json_object_lines(lines: Iterable[str], what: str) -> Iterator[tuple[int, dict[str, Any] | Rejection]]:
    """Each non-blank line of a JSON-lines stream, numbered from 1, as its object, or as a Rejection
    saying why it is not one (`what` names an item in the reason: "a rule is a JSON object")."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, Rejection(number, line.rstrip("\n"), f"invalid JSON: {err.msg}")
            continue
        if not isinstance(data, dict):
            yield number, Rejection(number, data, f"{what} is a JSON object")
            continue
        yield number, data


def _validate(row: SourceRow, model: type[BaseModel]) -> Any:
    if row.data is None:
        return Rejection(row.line, row.raw, row.error or "unreadable row")
    try:
        return model.model_validate(row.data)
    except ValidationError as err:
        return Rejection(row.line, row.raw, describe_validation_error(err))
    except (TypeError, ValueError, RecursionError) as err:  # odd Parquet values pydantic cannot judge
        return Rejection(row.line, row.raw, f"invalid row: {err}")


def validate_product(row: SourceRow) -> Product | Rejection:
    return _validate(row, Product)


def validate_signal(row: SourceRow) -> SignalUpdate | Rejection:
    return _validate(row, SignalUpdate)


def _json_safe(value: Any) -> Any:
    """Strict JSON for any raw row: NaN/inf (Parquet, CSV) become strings, other odd types str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _record_line(record: str) -> int:
    try:
        return int(json.loads(record)["line"])
    except (ValueError, KeyError, TypeError):
        return 0  # an unreadable record is kept rather than lost


class DeadLetters:
    """Rejected rows as JSONL `{"line", "raw", "reason"}`. The file is created on the first reject only.

    Appends (a resumed run continues the file its first attempt started) and flushes per batch, so the
    file is complete for every batch that was committed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.first: Rejection | None = None  # this run's first reject, for a one-line mention
        self._file: IO[str] | None = None

    def write(self, rejections: list[Rejection]) -> None:
        if not rejections:
            return
        self.first = self.first or rejections[0]
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        for rejection in rejections:
            record = _json_safe(rejection.to_dict())
            self._file.write(json.dumps(record, ensure_ascii=False, default=str, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.count += len(rejections)

    def drop_after(self, line: int) -> None:
        """Forget records past `line`: a resumed run re-reads those rows and rejects them again.

        A killed attempt may have written a batch's rejects without checkpointing it; keeping them
        would list those rows twice.
        """
        if self._file is not None or not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [r for r in f if r.strip() and _record_line(r) <= line]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def written(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
