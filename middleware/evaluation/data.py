"""BEIR-layout relevance data: corpus.jsonl, queries.jsonl, qrels-<split>.tsv.

Bad input raises `EvalDataError` naming the file and line, never a bare KeyError or traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from middleware.products import Product


class EvalDataError(ValueError):
    """The dataset is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str

    def to_product(self) -> Product:
        # the product sees the document as a catalog row: id, title, description
        title = self.title.strip() or self.text.strip()[:200] or self.id
        return Product(id=self.id, title=title, description=self.text or None)


@dataclass
class BeirDataset:
    name: str
    corpus: dict[str, Document]  # insertion order = file order
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]  # query id -> {doc id: graded score}
    split: str
    fingerprint: str  # sha1 of the corpus file: the index cache key
    notes: list[str] = field(default_factory=list)  # what was dropped while loading, and why

    def judged_query_ids(self) -> list[str]:
        """Queries with judgments and text, in sorted id order (stable across runs)."""
        return sorted(q for q in self.qrels if q in self.queries)


def _read_jsonl(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        raise EvalDataError(f"{kind} file not found: {path}")
    rows: list[dict] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object")
            if "_id" not in row:
                raise EvalDataError(f"{path}:{lineno}: missing field _id")
            row["_lineno"] = lineno
            rows.append(row)
    return rows


def _text_field(row: dict, name: str, path: Path) -> str:
    value = row.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EvalDataError(f"{path}:{row['_lineno']}: field {name} must be a string")
    return value


def load_corpus(path: Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for row in _read_jsonl(path, "corpus"):
        doc_id = str(row["_id"]).strip()
        if not doc_id:
            raise EvalDataError(f"{path}:{row['_lineno']}: empty _id")
        title = _text_field(row, "title", path)
        text = _text_field(row, "text", path)
        if not title.strip() and not text.strip():
            raise EvalDataError(f"{path}:{row['_lineno']}: document {doc_id} has neither title nor text")
        if doc_id in corpus:
            raise EvalDataError(f"{path}:{row['_lineno']}: duplicate _id {doc_id}")
        corpus[doc_id] = Document(doc_id, title, text)
    if not corpus:
        raise EvalDataError(f"{path}: corpus is empty")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for row in _read_jsonl(path, "queries"):
        text = _text_field(row, "text", path).strip()
        if not text:
            raise EvalDataError(f"{path}:{row['_lineno']}: query {row['_id']} has empty text")
        queries[str(row["_id"]).strip()] = text
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        raise EvalDataError(f"qrels file not found: {path}")
    qrels: dict[str, dict[str, float]] = {}
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if lineno == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid"}:
                continue  # header
            if len(row) < 3:
                raise EvalDataError(f"{path}:{lineno}: expected query-id, corpus-id, score")
            qid, did, raw = row[0].strip(), row[1].strip(), row[2].strip()
            try:
                score = float(raw)
            except ValueError:
                raise EvalDataError(f"{path}:{lineno}: score {raw!r} is not a number") from None
            if not math.isfinite(score):
                raise EvalDataError(f"{path}:{lineno}: score must be finite")
            qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise EvalDataError(f"{path}: no judgments")
    return qrels


def _sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def available_splits(data_dir: Path) -> list[str]:
    return sorted(p.name[len("qrels-") : -len(".tsv")] for p in data_dir.glob("qrels-*.tsv"))


def load_beir(data_dir: str | Path, split: str | None = None) -> BeirDataset:
    """Load a BEIR folder. split=None picks the only qrels file, or `test` when there are several."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalDataError(f"dataset directory not found: {data_dir}")
    splits = available_splits(data_dir)
    if split is None:
        if not splits:
            raise EvalDataError(f"{data_dir}: no qrels-<split>.tsv file")
        split = splits[0] if len(splits) == 1 else ("test" if "test" in splits else "")
        if not split:
            raise EvalDataError(f"{data_dir}: several splits ({', '.join(splits)}); choose one with --split")
    qrels_path = data_dir / f"qrels-{split}.tsv"
    if not qrels_path.is_file():
        found = ", ".join(splits) or "none"
        raise EvalDataError(f"{data_dir}: no qrels-{split}.tsv (splits found: {found})")

    corpus_path = data_dir / "corpus.jsonl"
    corpus = load_corpus(corpus_path)
    queries = load_queries(data_dir / "queries.jsonl")
    qrels = load_qrels(qrels_path)

    notes: list[str] = []
    # judgments on documents outside the corpus can never be retrieved: drop them, say how many
    unknown = sum(1 for judged in qrels.values() for d in judged if d not in corpus)
    if unknown:
        qrels = {q: {d: s for d, s in j.items() if d in corpus} for q, j in qrels.items()}
        qrels = {q: j for q, j in qrels.items() if j}
        notes.append(f"{unknown} judgments name documents missing from the corpus and were ignored")
    no_text = sum(1 for q in qrels if q not in queries)
    if no_text:
        notes.append(f"{no_text} judged queries have no text in queries.jsonl and were ignored")
    return BeirDataset(
        name=data_dir.resolve().name,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        split=split,
        fingerprint=_sha1_file(corpus_path),
        notes=notes,
    )


def sample_queries(query_ids: list[str], max_queries: int | None, seed: int) -> list[str]:
    """A seeded subsample (or all), returned in sorted id order so runs are comparable."""
    ids = sorted(query_ids)
    if max_queries is None or max_queries >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, max_queries))
