"""Crash safety: SIGKILL the loader at seeded random points, resume, and check the store against the catalog.

Indexing: `shopsearch index FILE --resume` runs as a subprocess and is killed (SIGKILL, no cleanup at
all) once its checkpoint has passed a seeded random line, after a further random delay so the kill
lands anywhere in a batch (reading, embedding, inside the SQLite commit, saving the faiss file). Each
kill is followed by another `--resume` run; the last run completes. Then the store must hold exactly
the catalog: every id once, its fields equal to the catalog's last valid row for that id, a vector
for every product equal to the embedder's vector for its text, and a faiss index that agrees with
SQLite (same ids, same vectors; knn of a stored vector returns its own id first), which deleting
vectors.faiss rebuilds identically.

Signal updates: `shopsearch update-signals FILE` killed at seeded random times and re-run from the
top (it sets absolute values, so a re-run is the resume). The final signals must equal the file's
last value per field and id; text and vector blobs must be byte-identical to before.

Force merge: `shopsearch force-merge` killed at seeded random moments between its start-up and the end
of a whole merge (both measured on a copy). After each kill the lexical index must hold exactly SQLite's
products with unchanged match counts; the last run merges to one segment, no larger than a merge that
was never killed.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.reliability.common import (
    CLI,
    env_for_cli,
    expected_signals,
    tiny_models,
    write_catalog,
    write_signal_updates,
)
from middleware.products import Product

POLL_S = 0.02


def _checkpoint_line(data_dir: Path) -> int:
    for path in (data_dir / "checkpoints").glob("*.json"):
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("last_line", 0))
        except (OSError, ValueError):
            return 0  # being replaced right now
    return 0


def _run_and_kill(
    cmd: list[str], env: dict[str, str], *, kill_when: Any, extra_delay_s: float, timeout_s: float
) -> dict[str, Any]:
    """Start `cmd`; SIGKILL it once `kill_when()` is true plus `extra_delay_s`. Reports what happened."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    try:
        while proc.poll() is None:
            if time.monotonic() - started > timeout_s:
                proc.kill()
                raise RuntimeError(f"{cmd[3:6]} did not finish within {timeout_s} s")
            if kill_when():
                time.sleep(extra_delay_s)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                break
            time.sleep(POLL_S)
        proc.wait()
    finally:
        stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    return {
        "killed": killed,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - started, 3),
        "stderr_tail": stderr.strip().splitlines()[-2:] if not killed else [],
    }


# ----------------------------------------------------------------------------------------- indexing


class _CheckpointWatch:
    """Kill condition of one indexing attempt: the checkpoint has passed `target` (and moved since the
    attempt started), then a further `fraction_of_batch` of one batch's time as measured in this run,
    so the kill lands anywhere inside a batch: reading, embedding, the SQLite commit, the faiss save."""

    def __init__(self, data_dir: Path, target: int, *, fraction_of_batch: float) -> None:
        self.data_dir = data_dir
        start = _checkpoint_line(data_dir)
        self.target = max(target, start + 1)
        self.fraction = fraction_of_batch
        self.line, self.changed_at = start, 0.0
        self.intervals: list[float] = []  # seconds between checkpoint writes in this run
        self.delay_s = 0.0
        self.fire_at: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        line = _checkpoint_line(self.data_dir)
        if line > self.line:
            if self.changed_at:  # the first write of a run also covers start-up: not a batch's time
                self.intervals.append(now - self.changed_at)
            self.line, self.changed_at = line, now
        # two intervals, the shorter taken: the first batch of a run also loads jieba's dictionary
        if self.fire_at is None and self.line >= self.target and len(self.intervals) >= 2:
            self.delay_s = self.fraction * min(self.intervals)
            self.fire_at = now + self.delay_s
        return self.fire_at is not None and now >= self.fire_at


def index_crash(
    work: Path, *, n_products: int, kills: int, seed: int, embedder: str = "tiny", batch_size: int = 256
) -> dict[str, Any]:
    """Index `n_products` with `kills` SIGKILLs and resumes; verify; return the figures."""
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / f"store-{embedder}"
    shutil.rmtree(data_dir, ignore_errors=True)
    catalog = work / f"catalog-{n_products}.jsonl"
    written = write_catalog(catalog, n_products, seed=seed)
    model = "none"
    if embedder == "tiny":
        model = str(tiny_models(work)[0])
    env = env_for_cli(work, data_dir)
    cmd = [*CLI, "index", str(catalog), "--resume", "--embedder", model, "--batch-size", str(batch_size), "-q"]
    rng = random.Random(seed)
    # kill targets: checkpoint lines spread over the file, ascending, each leaving at least four batches
    # to go, so the kill (within one batch after the target) always finds the loader still working
    last_target = max(batch_size + kills, written["rows"] - 4 * batch_size)
    targets = sorted(rng.sample(range(batch_size, last_target), kills))
    attempts: list[dict[str, Any]] = []
    started = time.monotonic()
    for target in targets:
        watch = _CheckpointWatch(data_dir, target, fraction_of_batch=rng.random())
        outcome = _run_and_kill(cmd, env, kill_when=watch, extra_delay_s=0, timeout_s=1800)
        outcome.update(
            target_line=watch.target,
            extra_delay_s=round(watch.delay_s, 3),
            checkpoint_after=_checkpoint_line(data_dir),
            faiss_file_vs_sqlite=_faiss_state(data_dir),  # stale/missing: the next open rebuilds it
        )
        attempts.append(outcome)
    final = _run_and_kill(cmd, env, kill_when=lambda: False, extra_delay_s=0, timeout_s=1800)
    final["final"] = True
    attempts.append(final)
    wall = time.monotonic() - started
    verdict = verify_index_store(data_dir, written["expected"], work if embedder == "tiny" else None)
    states = [a["faiss_file_vs_sqlite"] for a in attempts if a.get("killed")]
    return {
        "embedder": embedder,
        "faiss_after_kills": {state: states.count(state) for state in sorted(set(states))},
        "products": n_products,
        "catalog_rows": written["rows"],
        "bad_rows": written["bad"],
        "batch_size": batch_size,
        "kills": sum(1 for a in attempts if a["killed"]),
        "attempts": attempts,
        "final_exit_code": final["returncode"],
        "final_exit_ok": final["returncode"] in (0, 3) and (final["returncode"] == 3) == bool(written["bad"]),
        "seconds": round(wall, 1),
        **verdict,
    }


def _faiss_state(data_dir: Path) -> str:
    """Does vectors.faiss (header only) reflect SQLite's current generation, as a kill left them?"""
    from middleware.backends.embedded import DB_NAME, FAISS_NAME
    from middleware.backends.embedded.vectors import FAISS_HEADER

    db = sqlite3.connect(data_dir / DB_NAME)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        vectors = db.execute("SELECT count(vector) FROM products").fetchone()[0]
    except sqlite3.Error:
        return "no store yet"
    finally:
        db.close()
    path = data_dir / FAISS_NAME
    if not path.exists():
        return "missing" if vectors else "none (no vectors)"
    with open(path, "rb") as f:
        _, generation, _ = FAISS_HEADER.unpack(f.read(FAISS_HEADER.size))
    return "current" if row is not None and generation == int(row[0]) else "stale"


def _faiss_file(data_dir: Path) -> tuple[int, Any] | None:
    """(generation stamped in vectors.faiss, the faiss index) or None when there is no file."""
    import faiss

    from middleware.backends.embedded import FAISS_NAME
    from middleware.backends.embedded.vectors import FAISS_HEADER

    path = data_dir / FAISS_NAME
    if not path.exists():
        return None
    with open(path, "rb") as f:
        _, generation, _ = FAISS_HEADER.unpack(f.read(FAISS_HEADER.size))
        index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
    return generation, index


def _index_vectors(index: Any) -> dict[int, bytes]:
    import faiss

    ids = faiss.vector_to_array(index.id_map)
    return {int(i): index.reconstruct(int(i)).astype("<f4").tobytes() for i in ids}


def _verify_lexical(data_dir: Path, rows: list[tuple[Any, ...]], lexical_generation: int) -> dict[str, Any]:
    """The lexical index as the crash left it (stale is allowed: it catches up on open), then after an
    open: it holds exactly SQLite's products, each found by its own title."""
    import tantivy

    from middleware.backends.embedded import EmbeddedBackend
    from middleware.backends.embedded.lexical import INDEX_DIR, STAMP_NAME
    from middleware.products import Filters

    try:
        stamped = json.loads((data_dir / INDEX_DIR / STAMP_NAME).read_text())["generation"]
        state = "current" if stamped == lexical_generation else "stale (caught up on open)"
    except (OSError, ValueError, KeyError):
        state = "missing (built on open)"
    backend = EmbeddedBackend(data_dir)
    try:
        indexed = [pk for pk, _ in backend.lexical.all_matches(tantivy.Query.all_query())]
        found = 0
        sample = random.Random(2).sample(rows, min(200, len(rows)))
        for _, pid, doc, _ in sample:
            title = Product.model_validate_json(doc).title
            found += [c.id for c in backend.bm25(title, Filters(ids=[pid]), 1)] == [pid]
        stamp_now = backend.lexical.generation
    finally:
        backend.close()
    return {
        "lexical_file_at_the_end": state,
        "lexical_agrees": sorted(indexed) == sorted(int(r[0]) for r in rows)
        and found == len(sample)
        and stamp_now == lexical_generation,
        "lexical_self_found": f"{found}/{len(sample)}",
    }


def verify_index_store(data_dir: Path, expected: dict[str, Product], model_work: Path | None) -> dict[str, Any]:
    """Compare the store with the catalog (see the module docstring); every check counted, none assumed."""
    from middleware.backends.embedded import DB_NAME, FAISS_NAME, EmbeddedBackend

    db = sqlite3.connect(data_dir / DB_NAME)
    rows = db.execute("SELECT pk, id, doc, vector FROM products").fetchall()
    generation = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
    text_rows = db.execute("SELECT count(*) FROM product_text").fetchone()[0]
    category_orphans = db.execute(
        "SELECT count(*) FROM product_categories WHERE pk NOT IN (SELECT pk FROM products)"
    ).fetchone()[0]
    lexical_generation = db.execute("SELECT value FROM meta WHERE key = 'lexical_generation'").fetchone()
    db.close()

    stored_ids = [r[1] for r in rows]
    lost = sorted(set(expected) - set(stored_ids))
    extra = sorted(set(stored_ids) - set(expected))
    duplicated = len(stored_ids) - len(set(stored_ids))
    mismatched = [
        pid for _, pid, doc, _ in rows if pid in expected and Product.model_validate_json(doc) != expected[pid]
    ]
    with_vector = {pk: (pid, blob) for pk, pid, _, blob in rows if blob is not None}
    out: dict[str, Any] = {
        "stored": len(rows),
        "expected": len(expected),
        "lost": len(lost),
        "duplicated": duplicated,
        "unexpected": len(extra),
        "fields_mismatched": len(mismatched),
        "examples": {"lost": lost[:5], "unexpected": extra[:5], "mismatched": mismatched[:5]},
        "text_rows_match": text_rows == len(rows),
        "category_orphans": category_orphans,
        "sqlite_vectors": len(with_vector),
    }
    out.update(_verify_lexical(data_dir, rows, 0 if lexical_generation is None else int(lexical_generation[0])))

    # the derived index as the crash left it (before any open repairs it)
    on_disk = _faiss_file(data_dir)
    out["faiss_file_at_the_end"] = (
        "missing" if on_disk is None else ("current" if on_disk[0] == generation else "stale (rebuilt on open)")
    )
    if model_work is None:
        out["vectors_consistent"] = len(with_vector) == 0
        return out

    from benchmarks.reliability.common import load_models

    embedder = load_models(model_work)[0]
    rng = random.Random(1)
    sample_pks = rng.sample(sorted(with_vector), min(200, len(with_vector)))
    texts = [expected[with_vector[pk][0]].embedding_text() for pk in sample_pks]
    fresh = embedder.encode_documents(texts)
    stored = np.stack([np.frombuffer(with_vector[pk][1], dtype="<f4") for pk in sample_pks])
    out["vectors_equal_fresh_embedding"] = bool(np.allclose(fresh, stored, atol=1e-4))
    out["products_without_vector"] = len(rows) - len(with_vector)

    backend = EmbeddedBackend(data_dir, dim=embedder.dim)  # loads vectors.faiss or rebuilds it
    try:
        stats = backend.stats()
        self_first = 0
        for pk in sample_pks:
            pid, blob = with_vector[pk]
            hits = backend.knn(np.frombuffer(blob, dtype="<f4"), None, 3)
            # ties: the own id must score as high as the first hit
            if hits and (hits[0].id == pid or any(h.id == pid and h.knn >= hits[0].knn - 1e-6 for h in hits)):
                self_first += 1
    finally:
        backend.close()  # saves the index it serves
    loaded = _faiss_file(data_dir)
    assert loaded is not None
    served = _index_vectors(loaded[1])
    sql_vectors = {pk: blob for pk, (_, blob) in with_vector.items()}
    out["faiss_ntotal"] = int(loaded[1].ntotal)
    out["faiss_equals_sqlite"] = served == sql_vectors and stats.details["index_vectors"] == len(with_vector)
    out["knn_self_first"] = f"{self_first}/{len(sample_pks)}"

    (data_dir / FAISS_NAME).unlink()
    backend = EmbeddedBackend(data_dir, dim=embedder.dim)
    backend.close()
    rebuilt = _faiss_file(data_dir)
    assert rebuilt is not None
    out["rebuild_identical"] = _index_vectors(rebuilt[1]) == served and rebuilt[0] == generation
    out["vectors_consistent"] = bool(
        out["faiss_equals_sqlite"]
        and self_first == len(sample_pks)
        and out["rebuild_identical"]
        and out["vectors_equal_fresh_embedding"]
        and out["products_without_vector"] == 0
    )
    return out


# ------------------------------------------------------------------------------------ signal updates


def _signal_state(data_dir: Path) -> dict[str, tuple[dict[str, Any], bytes | None, str]]:
    """id → (signals, vector blob, doc without the signals) straight from SQLite."""
    from middleware.backends.embedded import DB_NAME

    db = sqlite3.connect(data_dir / DB_NAME)
    out = {}
    for pid, doc, blob, price, sales, stock in db.execute("SELECT id, doc, vector, price, sales, stock FROM products"):
        fields = json.loads(doc)
        signals = {k: fields.pop(k, None) for k in ("price", "sales", "stock")}
        if (signals["price"], signals["sales"], signals["stock"]) != (price, sales, stock):
            signals["column_mismatch"] = True  # the JSON and the filter columns disagree
        out[pid] = (signals, blob, json.dumps(fields, sort_keys=True, ensure_ascii=False))
    db.close()
    return out


class _WriteWatch:
    """When did the store's SQLite WAL first change (the run started writing)?"""

    def __init__(self, data_dir: Path) -> None:
        self.wal = data_dir / "catalog.sqlite3-wal"
        self.initial = self._stamp()
        self.first: float | None = None
        self.ended: float | None = None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.wal.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def writing_for(self) -> float:
        """Seconds since the first write seen (-1 before it)."""
        if self.first is None and self._stamp() != self.initial:
            self.first = time.monotonic()
        return -1.0 if self.first is None else time.monotonic() - self.first

    def poll_never(self) -> bool:
        self.writing_for()
        self.ended = time.monotonic()
        return False


def signals_crash(work: Path, data_dir: Path, *, n_updates: int, kills: int, seed: int) -> dict[str, Any]:
    """Kill `update-signals` `kills` times at random moments, re-run it, compare with the expected state."""
    before = _signal_state(data_dir)
    updates = work / "signals.jsonl"
    write_signal_updates(updates, sorted(before), n_updates, seed=seed)
    wanted = expected_signals(updates)
    env = env_for_cli(work, data_dir)
    cmd = [*CLI, "update-signals", str(updates), "--batch-size", "500", "-q"]

    # how long a full run writes (first change of the SQLite WAL to exit), measured on a copy: kills land
    # in that window, not in the interpreter's start-up
    reference = work / "signals-reference"
    shutil.rmtree(reference, ignore_errors=True)
    shutil.copytree(data_dir, reference)
    ref_writes = _WriteWatch(reference)
    full = _run_and_kill(
        cmd, env_for_cli(work, reference), kill_when=ref_writes.poll_never, extra_delay_s=0, timeout_s=900
    )
    write_s = max(0.05, (ref_writes.ended or time.monotonic()) - (ref_writes.first or time.monotonic()))
    shutil.rmtree(reference, ignore_errors=True)
    rng = random.Random(seed)
    attempts: list[dict[str, Any]] = []
    partial_states = 0
    tries = 0
    while sum(a["killed"] for a in attempts) < kills and tries < 4 * kills:
        tries += 1
        delay = rng.uniform(0.0, 0.9) * write_s
        watch = _WriteWatch(data_dir)
        outcome = _run_and_kill(
            cmd, env, kill_when=lambda w=watch, d=delay: w.writing_for() >= d, extra_delay_s=0, timeout_s=900
        )
        outcome["kill_after_first_write_s"] = round(delay, 3)
        if outcome["killed"]:
            state = _signal_state(data_dir)
            done = sum(1 for pid, sig in wanted.items() if all(state[pid][0].get(k) == v for k, v in sig.items()))
            outcome["ids_already_final"] = done
            partial_states += 0 < done < len(wanted)
        attempts.append(outcome)
    final = _run_and_kill(cmd, env, kill_when=lambda: False, extra_delay_s=0, timeout_s=900)
    final["final"] = True
    attempts.append(final)

    after = _signal_state(data_dir)
    wrong_signals = 0
    for pid, (signals, _, _) in after.items():
        want = {**before[pid][0], **wanted.get(pid, {})}
        want.pop("column_mismatch", None)
        if signals != want:
            wrong_signals += 1
    return {
        "updates": n_updates,
        "ids_updated": len(wanted),
        "full_run_seconds": full["seconds"],
        "full_run_writing_seconds": round(write_s, 3),
        "kills": sum(1 for a in attempts if a["killed"]),
        "killed_mid_run_with_partial_state": partial_states,
        "attempts": attempts,
        "final_exit_code": final["returncode"],
        "products_before": len(before),
        "products_after": len(after),
        "signals_wrong": wrong_signals,
        "vectors_byte_identical": all(after[p][1] == before[p][1] for p in before) and set(after) == set(before),
        "text_unchanged": all(after[p][2] == before[p][2] for p in before),
    }


# ------------------------------------------------------------------------------------- force merge


def _add_segments(data_dir: Path, *, rounds: int, per_round: int, rng: random.Random) -> None:
    """Give the lexical index more segments: `rounds` separate signal writes of `per_round` products each
    (same values), every one a commit that re-adds its products' documents."""
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import SignalUpdate

    for _ in range(rounds):
        with EmbeddedBackend(data_dir) as backend:
            ids = sorted(backend.iter_ids())
            products = backend.get(rng.sample(ids, min(per_round, len(ids))))
            backend.update_signals([SignalUpdate(id=p.id, sales=p.sales) for p in products])


def _merge_state(data_dir: Path, queries: list[str]) -> dict[str, Any]:
    """The lexical index as an open finds it: segments, bytes on disk, match counts of `queries`, and
    whether it holds exactly SQLite's products (`_verify_lexical`)."""
    from middleware.backends.base import MatchSet
    from middleware.backends.embedded import DB_NAME, EmbeddedBackend

    db = sqlite3.connect(data_dir / DB_NAME)
    rows = db.execute("SELECT pk, id, doc, NULL FROM products").fetchall()
    lexical_generation = db.execute("SELECT value FROM meta WHERE key = 'lexical_generation'").fetchone()
    db.close()
    with EmbeddedBackend(data_dir) as backend:
        details = backend.lexical.details()
        counts = [backend.count_matches(MatchSet(text=q)) for q in queries]
    state = {"segments": int(details["segments"]), "lexical_bytes": int(details["size_bytes"]), "counts": counts}
    state.update(_verify_lexical(data_dir, rows, 0 if lexical_generation is None else int(lexical_generation[0])))
    return state


def merge_crash(work: Path, data_dir: Path, *, kills: int, seed: int) -> dict[str, Any]:
    """SIGKILL `shopsearch force-merge` at seeded random moments of its run, then run it to the end.

    After every kill the index must hold exactly SQLite's products and answer every sample query with
    the same match count as before; a kill after the merge's commit leaves it merged, which the next
    attempt undoes by adding segments. The files of killed merges must not pile up: the final merge's
    index is compared in size with a merge that was never killed."""
    rng = random.Random(seed)
    _add_segments(data_dir, rounds=3, per_round=200, rng=rng)
    db = sqlite3.connect(data_dir / "catalog.sqlite3")
    titles = [r[0] for r in db.execute("SELECT json_extract(doc, '$.title') FROM products ORDER BY pk")]
    db.close()
    queries = [" ".join(t.split()[:2]) for t in rng.sample(titles, min(30, len(titles)))]
    before = _merge_state(data_dir, queries)
    cmd = [*CLI, "force-merge", "--json"]

    # the kill window, measured on a copy: from a merge with nothing to merge (start-up and the open)
    # to a whole merge
    reference = work / "merge-reference"
    shutil.rmtree(reference, ignore_errors=True)
    shutil.copytree(data_dir, reference)
    whole = _run_and_kill(cmd, env_for_cli(work, reference), kill_when=lambda: False, extra_delay_s=0, timeout_s=900)
    nothing = _run_and_kill(cmd, env_for_cli(work, reference), kill_when=lambda: False, extra_delay_s=0, timeout_s=900)
    never_killed = _merge_state(reference, queries)
    shutil.rmtree(reference, ignore_errors=True)

    env = env_for_cli(work, data_dir)
    attempts: list[dict[str, Any]] = []
    low, high = nothing["seconds"], whole["seconds"]
    while sum(a["killed"] for a in attempts) < kills and len(attempts) < 4 * kills:
        if _merge_state(data_dir, [])["segments"] <= 1:  # merged by the last attempt: nothing left to kill
            _add_segments(data_dir, rounds=2, per_round=200, rng=rng)
        delay = rng.uniform(min(low, 0.9 * high), high)
        started = time.monotonic()
        outcome = _run_and_kill(
            cmd, env, kill_when=lambda t=started, d=delay: time.monotonic() - t >= d, extra_delay_s=0, timeout_s=900
        )
        state = _merge_state(data_dir, queries)
        outcome.update(
            kill_after_s=round(delay, 3),
            left=("merged" if state["segments"] == 1 else "as before") if outcome["killed"] else "finished first",
            segments=state["segments"],
            lexical_bytes=state["lexical_bytes"],
            lexical_agrees=state["lexical_agrees"],
            counts_unchanged=state["counts"] == before["counts"],
        )
        attempts.append(outcome)
        if not outcome["killed"]:  # a run quicker than the reference (which paid for a cold start): kill sooner
            high = min(high, outcome["seconds"])
    final = _run_and_kill(cmd, env, kill_when=lambda: False, extra_delay_s=0, timeout_s=900)
    after = _merge_state(data_dir, queries)
    killed = [a for a in attempts if a["killed"]]
    return {
        "products": len(titles),
        "queries": len(queries),
        "merge_seconds": whole["seconds"],
        "nothing_to_merge_seconds": nothing["seconds"],
        "segments_before": before["segments"],
        "kills": len(killed),
        "kills_left": {left: sum(a["left"] == left for a in killed) for left in ("as before", "merged")},
        "attempts": attempts,
        "every_kill_agrees": all(a["lexical_agrees"] and a["counts_unchanged"] for a in killed),
        "final_exit_code": final["returncode"],
        "final_segments": after["segments"],
        "final_agrees": after["lexical_agrees"] and after["counts"] == before["counts"],
        "final_lexical_bytes": after["lexical_bytes"],
        "never_killed_lexical_bytes": never_killed["lexical_bytes"],
        "max_lexical_bytes_after_a_kill": max((a["lexical_bytes"] for a in killed), default=None),
    }


def run(work: Path, *, quick: bool, seed: int = 20240611) -> dict[str, Any]:
    """Every crash scenario: BM25-only (--embedder none) and tiny-model indexing, signal updates, force merge."""
    n = 3_000 if quick else 20_000
    kills = 2 if quick else 5
    results: dict[str, Any] = {}
    results["index_bm25_only"] = index_crash(work, n_products=n, kills=kills, seed=seed, embedder="none")
    results["index_tiny_model"] = index_crash(work, n_products=n, kills=kills, seed=seed + 1, embedder="tiny")
    results["update_signals"] = signals_crash(
        work, work / "store-tiny", n_updates=(6_000 if quick else 60_000), kills=kills, seed=seed + 2
    )
    results["force_merge"] = merge_crash(work, work / "store-none", kills=kills, seed=seed + 3)
    return results
