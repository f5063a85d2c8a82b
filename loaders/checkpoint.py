"""Resume points: the last committed source line of a file, written atomically after each batch.

A batch is committed by the backend first and checkpointed second. A `kill -9` between the two loses
only the checkpoint: `--resume` then replays that batch, which is harmless because upserts are by id.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_json(path: Path, value: Any) -> None:
    """Write-to-temp + fsync + rename: readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # the rename itself must reach the disk too
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def source_fingerprint(path: str) -> str:
    """Identity of a source file: absolute path + size + mtime. A changed file gets a new checkpoint."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


class Checkpoint:
    """One source file's checkpoint under `<data_dir>/checkpoints/`."""

    def __init__(self, directory: Path, source_path: str) -> None:
        self.source_path = source_path
        self.path = directory / f"{source_fingerprint(source_path)}.json"

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable checkpoint: start over (re-indexing is idempotent)
        return state if isinstance(state, dict) and isinstance(state.get("last_line"), int) else None

    def save(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"source": os.path.abspath(self.source_path), **state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
