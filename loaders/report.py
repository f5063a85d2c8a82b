"""Run summaries (printed and saved as JSON) and progress: a tqdm bar on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


@dataclass
class Summary:
    """Counts of one run. Every valid row ends in exactly one of indexed/updated/unchanged/duplicates."""

    command: str = "index"
    source: str = ""
    read: int = 0  # non-blank rows read (valid + rejected)
    indexed: int = 0  # products new to the store
    updated: int = 0  # products that existed and changed (text, fields or signals)
    unchanged: int = 0  # identical to the stored product: neither embedded nor written
    rejected: int = 0  # rows sent to the dead-letter file
    duplicates: int = 0  # rows superseded by a later row with the same id in the same batch
    not_found: int = 0  # signal updates for ids not in the store
    truncated: int = 0  # fields cut to their bound (long descriptions); the product was indexed
    truncated_examples: list[str] = field(default_factory=list)  # the first few, "line N: field cut …"
    deleted: int = 0
    embedded: int = 0  # texts the model encoded
    cache_hits: int = 0  # texts whose vector came from the embedding cache
    resumed_from_line: int = 0
    resumed_rows_skipped: int = 0  # rows of a resumed run that were committed by the earlier attempt
    pruned: bool = False
    prune_refused: str | None = None
    dead_letter_path: str | None = None
    seconds: float = 0.0
    docs_per_second: float = 0.0
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    seconds_embedding: float = 0.0  # time inside the embedder (cache misses only)
    seconds_writing: float = 0.0  # time inside backend writes

    def finish(self, seconds: float) -> None:
        self.seconds = round(seconds, 3)
        processed = self.read - self.resumed_rows_skipped
        self.docs_per_second = round(processed / seconds, 1) if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        parts = [
            f"read {self.read}",
            f"indexed {self.indexed}",
            f"updated {self.updated}",
            f"unchanged {self.unchanged}",
            f"rejected {self.rejected}",
        ]
        if self.duplicates:
            parts.append(f"duplicates {self.duplicates}")
        if self.not_found:
            parts.append(f"not found {self.not_found}")
        if self.deleted or self.pruned:
            parts.append(f"deleted {self.deleted}")
        out = [", ".join(parts) + f" in {self.seconds:.1f} s ({self.docs_per_second:.0f} docs/s)"]
        if self.embedded or self.cache_hits:
            out.append(f"embedded {self.embedded} texts, {self.cache_hits} from the embedding cache")
        if self.truncated:
            first = f" ({self.truncated_examples[0]})" if self.truncated_examples else ""
            out.append(f"cut {self.truncated} over-long text fields to their bounds; the products were indexed{first}")
        if self.resumed_from_line:
            out.append(f"resumed after line {self.resumed_from_line}")
        if (self.rejected or self.not_found) and self.dead_letter_path:
            out.append(f"rejected rows written to {self.dead_letter_path}")
        if self.prune_refused:
            out.append(f"prune skipped: {self.prune_refused}")
        return out


class Progress:
    """Rows processed so far: a tqdm bar when `stream` is a terminal, else one line every `every_s` seconds."""

    def __init__(self, label: str, *, stream: TextIO | None = None, every_s: float = 10.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.label = label
        self.every_s = every_s
        self.enabled = enabled
        self.rows = 0  # rows of this run
        self.resumed_rows = 0  # rows an earlier, resumed attempt committed: shown in the total, not the rate
        self.start = time.monotonic()
        self._last_log = self.start
        self._bar: Any = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(desc=label, unit=" rows", file=self.stream, dynamic_ncols=True)

    def resume_from(self, rows: int) -> None:
        """Count `rows` committed by an earlier attempt, so the total agrees with the run's counts."""
        self.resumed_rows = rows
        if self._bar is not None:
            self._bar.initial = self._bar.n = rows  # tqdm's rate counts from `initial`
            self._bar.refresh()

    def update(self, rows: int, **counts: int) -> None:
        self.rows += rows
        if not self.enabled:
            return
        if self._bar is not None:
            if counts:
                self._bar.set_postfix(counts, refresh=False)  # shown by the update below
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            rate = self.rows / max(now - self.start, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in counts.items())
            total = self.resumed_rows + self.rows
            print(f"{self.label}: {total} rows ({rate:.0f}/s){extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
