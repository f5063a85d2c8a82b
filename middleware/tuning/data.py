"""Training pairs for the tuning loop: read/write the FlagEmbedding-style JSONL, build pairs from BEIR.

A pairs record is one JSON object a line: `{"query": str, "pos": [str, ...]}` plus optional fields
that later steps add or use: `neg` (mined), `pos_scores`/`neg_scores` (teacher logits),
`query_id`, `pos_ids`, `pos_labels` (graded relevance in [0, 1]), `judged`/`judged_ids`/
`judged_labels` (judged documents below the relevance threshold: kept out of the negatives, used as
graded examples by the reranker). Unknown fields are carried through untouched.
"""

from __future__ import annotations

import csv
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TuningDataError(ValueError):
    """Bad input file or parameter; the message names the file, line and field."""


# ------------------------------------------------------------------------------------------- text


_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Comparison key for near-duplicate checks: NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def document_text(title: str, text: str) -> str:
    """A BEIR document as the embedder sees the product: title, then description (Product.embedding_text)."""
    title, text = title.strip(), text.strip()
    if title and text:
        return f"{title}\n{text}"
    return title or text


# ------------------------------------------------------------------------------------------- JSONL


def _check_text_list(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TuningDataError(f"{where}: field {name!r} must be a list of strings")
    return value


def _check_number_list(value: Any, name: str, where: str, length: int) -> None:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TuningDataError(f"{where}: field {name!r} must be a list of numbers")
    if len(value) != length:
        raise TuningDataError(f"{where}: field {name!r} has {len(value)} values for {length} texts")


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one pairs record; raises TuningDataError naming `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise TuningDataError(f"{where}: expected a JSON object")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise TuningDataError(f"{where}: field 'query' must be a non-empty string")
    if "pos" not in record:
        raise TuningDataError(f"{where}: field 'pos' is missing")
    pos = _check_text_list(record["pos"], "pos", where)
    if not pos:
        raise TuningDataError(f"{where}: field 'pos' must hold at least one text")
    neg = _check_text_list(record.get("neg", []), "neg", where)
    for name, texts in (("pos_scores", pos), ("pos_labels", pos), ("neg_scores", neg)):
        if name in record:
            _check_number_list(record[name], name, where, len(texts))
    return record


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed value) of each non-blank line of a JSONL file; invalid JSON raises naming the line."""
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise TuningDataError(f"{where}: invalid JSON ({err.msg})") from None


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """All records of a pairs JSONL file, validated; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise TuningDataError(f"input file not found: {path}")
    records = [validate_record(raw, where) for where, raw in json_lines(path)]
    if not records:
        raise TuningDataError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records one a line, Chinese kept readable (ensure_ascii=False); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


# ------------------------------------------------------------------------------------------- BEIR


@dataclass
class BeirCorpus:
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def _iter_jsonl(path: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise TuningDataError(f"{kind} file not found: {path}")
    for where, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("_id"), (str, int)):
            raise TuningDataError(f"{where}: each {kind} line needs an '_id'")
        yield where, row


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name) or ""
    if not isinstance(value, str):
        raise TuningDataError(f"{where}: field {name!r} must be a string")
    return value


def load_corpus(path: str | Path) -> BeirCorpus:
    """A BEIR corpus.jsonl as parallel id/text lists (text = title, then body)."""
    ids: list[str] = []
    texts: list[str] = []
    for where, row in _iter_jsonl(Path(path), "corpus"):
        text = document_text(_text(row, "title", where), _text(row, "text", where))
        if not text:
            raise TuningDataError(f"{where}: document has neither 'title' nor 'text'")
        ids.append(str(row["_id"]))
        texts.append(text)
    if not ids:
        raise TuningDataError(f"{path}: empty corpus")
    return BeirCorpus(ids, texts)


def load_queries(path: str | Path) -> dict[str, str]:
    return {str(row["_id"]): _text(row, "text", where) for where, row in _iter_jsonl(Path(path), "queries")}


def load_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise TuningDataError(f"qrels file not found: {path}")
    qrels: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for line_no, row in enumerate(reader, 1):
            if not row or (line_no == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise TuningDataError(f"{path}:{line_no}: expected query-id, corpus-id, score")
            try:
                score = float(row[2])
            except ValueError:
                raise TuningDataError(f"{path}:{line_no}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


# ------------------------------------------------------------------------------------------- pairs


def split_by_query(query_ids: Sequence[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of query ids (sorted first, so the split does not depend on file order)."""
    if not 0.0 <= dev_fraction < 1.0:
        raise TuningDataError(f"--dev-fraction must be in [0, 1), got {dev_fraction}")
    ids = sorted(set(query_ids))
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    n_dev = round(len(ids) * dev_fraction)
    dev = set(shuffled[:n_dev])
    return [q for q in ids if q not in dev], [q for q in ids if q in dev]


@dataclass
class PairsBuild:
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    train_ids: list[str]
    dev_ids: list[str]
    skipped_no_positive: int = 0
    notes: list[str] = field(default_factory=list)


def build_pairs(
    data_dir: str | Path,
    *,
    split: str = "train",
    threshold: float = 1.0,
    dev_fraction: float = 0.1,
    seed: int = 42,
    label_min: float | None = None,
    label_max: float | None = None,
) -> tuple[PairsBuild, BeirCorpus, dict[str, str], dict[str, dict[str, float]]]:
    """Pairs from a BEIR folder: documents judged ≥ threshold are positives; the others judged are
    `judged` (never mined as negatives). Grades are scaled to [0, 1] with label_min/max (default: the
    qrels' own range). Queries are split into train/dev BY QUERY before anything else."""
    data_dir = Path(data_dir)
    corpus = load_corpus(data_dir / "corpus.jsonl")
    queries = load_queries(data_dir / "queries.jsonl")
    qrels = load_qrels(data_dir / f"qrels-{split}.tsv")
    if not qrels:
        raise TuningDataError(f"{data_dir}/qrels-{split}.tsv: no judgments")
    doc_text = dict(zip(corpus.ids, corpus.texts, strict=True))
    grades = [s for judged in qrels.values() for s in judged.values()]
    lo = min(grades) if label_min is None else label_min
    hi = max(grades) if label_max is None else label_max
    span = (hi - lo) or 1.0

    def scaled(score: float) -> float:
        return round(min(1.0, max(0.0, (score - lo) / span)), 4)

    train_ids, dev_ids = split_by_query([q for q in qrels if q in queries], dev_fraction, seed)
    build = PairsBuild([], [], train_ids, dev_ids)
    missing_docs = sum(1 for judged in qrels.values() for d in judged if d not in doc_text)
    if missing_docs:
        build.notes.append(f"{missing_docs} judgments name documents missing from the corpus (ignored)")
    dev_set = set(dev_ids)
    for qid in train_ids + dev_ids:
        judged = sorted(((d, s) for d, s in qrels[qid].items() if d in doc_text), key=lambda item: (-item[1], item[0]))
        pos = [(d, s) for d, s in judged if s >= threshold]
        rest = [(d, s) for d, s in judged if s < threshold]
        if not pos:
            build.skipped_no_positive += 1
            continue
        record = {
            "query": queries[qid],
            "pos": [doc_text[d] for d, _ in pos],
            "query_id": qid,
            "pos_ids": [d for d, _ in pos],
            "pos_labels": [scaled(s) for _, s in pos],
            "judged": [doc_text[d] for d, _ in rest],
            "judged_ids": [d for d, _ in rest],
            "judged_labels": [scaled(s) for _, s in rest],
        }
        (build.dev if qid in dev_set else build.train).append(record)
    return build, corpus, queries, qrels


def write_pairs_build(
    build: PairsBuild,
    out_dir: str | Path,
    data_dir: str | Path,
    queries: dict[str, str],
    qrels: dict[str, dict[str, float]],
    *,
    split: str,
) -> dict[str, Any]:
    """train.jsonl, dev.jsonl, train/dev query-id lists, and `beir/` (the corpus linked, the queries and
    qrels-train/qrels-dev restricted to each side) so `shopsearch eval OUT/beir --split dev` runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", build.train)
    write_jsonl(out_dir / "dev.jsonl", build.dev)
    (out_dir / "train_query_ids.txt").write_text("".join(f"{q}\n" for q in build.train_ids))
    (out_dir / "dev_query_ids.txt").write_text("".join(f"{q}\n" for q in build.dev_ids))
    beir = out_dir / "beir"
    beir.mkdir(exist_ok=True)
    corpus_link = beir / "corpus.jsonl"
    if corpus_link.is_symlink() or corpus_link.exists():
        corpus_link.unlink()
    corpus_link.symlink_to((Path(data_dir) / "corpus.jsonl").resolve())
    used = set(build.train_ids) | set(build.dev_ids)
    write_jsonl(beir / "queries.jsonl", ({"_id": q, "text": queries[q]} for q in sorted(used)))
    for side, ids in (("train", build.train_ids), ("dev", build.dev_ids)):
        with (beir / f"qrels-{side}.tsv").open("w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for qid in ids:
                for doc_id, score in sorted(qrels[qid].items()):
                    fh.write(f"{qid}\t{doc_id}\t{score:g}\n")
    summary = {
        "source": str(Path(data_dir).resolve()),
        "split": split,
        "train_queries": len(build.train_ids),
        "dev_queries": len(build.dev_ids),
        "train_records": len(build.train),
        "dev_records": len(build.dev),
        "skipped_no_positive": build.skipped_no_positive,
        "notes": build.notes,
    }
    (out_dir / "pairs_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
