"""Small admin-edited record sets (merchandising rules, A/B experiments) kept in one JSON file each.

One writer at a time across processes (an flock beside the file), written by atomic rename and
fsync; every reader re-reads the file when its stamp changes, so all workers see an edit.
Caveat: the stamp is (mtime_ns, size, inode); the rename gives each write a new inode, so a change
is never missed, but a reader may re-read an unchanged file after it was touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RECORD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ScheduledRecord(BaseModel):
    """A stored record with an id and an active window: in force while enabled, from `active_from`
    (inclusive) until `active_until` (exclusive). Datetimes without a zone are UTC."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="letters, digits and . _ : - (at most 128 characters)")
    active_from: datetime | None = None
    active_until: datetime | None = None
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _record_id(cls, value: str) -> str:
        if not RECORD_ID.match(value):
            raise ValueError("must be 1-128 characters: letters, digits and . _ : - (starting with a letter or digit)")
        return value

    @field_validator("active_from", "active_until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _window(self) -> ScheduledRecord:
        if self.active_from and self.active_until and self.active_from >= self.active_until:
            raise ValueError("active_until: must be after active_from")
        return self

    def active(self, now: datetime) -> bool:
        if not self.enabled:
            return False
        if self.active_from is not None and now < self.active_from:
            return False
        return not (self.active_until is not None and now >= self.active_until)


class _Record(Protocol):
    id: str

    def model_dump(self, **kwargs: Any) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Record)


def first_error(err: ValidationError, default: str) -> tuple[str, str]:
    """(field, message) of a record's first validation error (`pin.0.position`, `variants.1.overlay.rrf_k`).
    Model-level checks name their field at the front of the message, as `field: message`."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[a-z_]+", head):
        loc, msg = ".".join(p for p in (loc, head) if p), rest
    return loc or default, msg


class JsonRecordStore(Generic[R]):
    """Records with an `id`, in one JSON file `{<key>: [...]}`, in id order."""

    key: ClassVar[str]
    model: ClassVar[type[BaseModel]]
    dump_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._records: list[R] = []

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def version(self) -> str:
        """Changes whenever the stored records change (cursors over an order they shape check it)."""
        stamp = self._stamp()
        return "none" if stamp is None else "-".join(str(v) for v in stamp)

    def all(self) -> list[R]:
        """Every stored record, in id order."""
        stamp = self._stamp()
        with self._lock:
            if stamp != self._seen:
                self._records = self._read() if stamp is not None else []
                self._seen = stamp
            return list(self._records)

    def get(self, record_id: str) -> R | None:
        return next((r for r in self.all() if r.id == record_id), None)

    def delete(self, record_id: str) -> bool:
        """Remove by id; whether it was there."""
        with self._writing() as current:
            found = current.pop(record_id, None) is not None
        return found

    def _read(self) -> list[R]:
        with open(self.path, encoding="utf-8") as f:
            data = json.load(f)
        records: list[R] = [self.model.model_validate(r) for r in data.get(self.key, [])]  # type: ignore[misc]
        return sorted(records, key=lambda r: r.id)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, R]]:
        """The stored records by id, under the cross-process lock; what the block leaves is written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time across workers
            current = {r.id: r for r in (self._read() if self.path.exists() else [])}
            before = dict(current)
            yield current
            if current == before:
                return
            ordered = sorted(current.values(), key=lambda r: r.id)
            payload = {self.key: [r.model_dump(mode="json", **self.dump_options) for r in ordered]}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
