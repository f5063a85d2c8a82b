"""Which lexical analysis ranks best, scored the way the embedded store's tantivy index scores.

For each analysis variant (`middleware.text.Analysis` options) the corpus is analysed into the
lexical fields, indexed into a RAM tantivy index (one whitespace-tokenised text field per lexical
field, the tokens space-joined), and every query becomes a boolean "should" of one term query per
(field, distinct token), each boosted by the field's boost: BM25 per field, summed with boosts.
nDCG@10 over the top 100 (linear gains: homedepot score - 1, qbqtc label), on homedepot (English,
all judged queries with a positive gain) and qbqtc (Chinese, a seeded sample of the queries with a
positive label). bm25s with its own English stemming and stopwords is the peer on homedepot.
Also measures `analyze_product` docs/s on qbqtc titles with a 200-character description, with
the analysis caches warm and cleared before every document.

Query-time typo tolerance (`middleware.query_expansion.typo_corrections`) is scored on the chosen
analysis too, its fuzzy term lookup run over the corpus titles' as-typed words (`VocabFuzzy`, the
embedded store's `fuzzy_terms` over its suggest field), on the queries as given and with one seeded
typo in one word of each query (`--typo-rate`).

    python -m benchmarks.lexical_analysis [--data ../shared/data] [--qbqtc-queries 4000] [--seed 0]

Prints a table and writes benchmarks/results/lexical_analysis.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from middleware import text as text_module
from middleware.backends.base import TermCount
from middleware.query_expansion import typo_corrections
from middleware.text import ANALYSIS, ANALYSIS_VERSION, Analysis, suggest_terms

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "lexical_analysis.json"

Fields = dict[str, list[str]]


@dataclass(frozen=True)
class Variant:
    name: str
    analysis: Analysis


_V2: list[Variant] = [
    Variant(
        "v1 (no stem or split)", Analysis(stem=False, split=False, stopwords="keep", unigrams="all", latin_in_cjk=True)
    ),
    Variant("+stem", Analysis(split=False, stopwords="keep", unigrams="all", latin_in_cjk=True)),
    Variant("+stem +split", Analysis(stopwords="keep", unigrams="all", latin_in_cjk=True)),
    Variant("+stem +split +joined", Analysis(joined=True, stopwords="keep", unigrams="all", latin_in_cjk=True)),
    Variant("+stopwords drop", Analysis(stopwords="drop", unigrams="all", latin_in_cjk=True)),
    Variant("+stopwords index", Analysis(stopwords="index", unigrams="all", latin_in_cjk=True)),
    Variant("+lone unigrams", Analysis(unigrams="lone", latin_in_cjk=True)),
    Variant("+lone unigrams -latin in cjk", Analysis(unigrams="lone", latin_in_cjk=False)),
    Variant("unigram field 0.25", Analysis(unigrams="field", uni_boost=0.25, latin_in_cjk=True)),
    Variant("unigram field 0.5", Analysis(unigrams="field", uni_boost=0.5, latin_in_cjk=True)),
    Variant("unigram field 1", Analysis(unigrams="field", uni_boost=1.0, latin_in_cjk=True)),
]
# the rows above as measured before folding and pinyin existed; then each of the two, and both
VARIANTS: list[Variant] = [Variant(v.name, replace(v.analysis, fold=False, pinyin=False)) for v in _V2] + [
    Variant("+fold", Analysis(pinyin=False)),
    Variant("+pinyin 0.5", Analysis(fold=False)),
    Variant("+fold +pinyin 0.25", Analysis(pinyin_boost=0.25)),
    Variant("+fold +pinyin 0.5", Analysis()),
]


class VocabFuzzy:
    """`Backend.fuzzy_terms` over the as-typed title words of a corpus, as the embedded store walks
    its suggest field: same first letter, optimal-string-alignment distance, nearest then most frequent."""

    def __init__(self, titles: list[str]) -> None:
        from rapidfuzz.distance import OSA

        self.osa = OSA
        counts = Counter(term for title in titles for term in suggest_terms(title))
        self.by_first: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for term, count in counts.items():
            self.by_first[term[0]].append((term, count))

    def fuzzy_terms(self, word: str, max_edits: int, n: int) -> list[TermCount]:
        scored = []
        for term, count in self.by_first.get(word[:1], ()):
            distance = self.osa.distance(word, term, score_cutoff=max_edits)
            if distance <= max_edits:
                scored.append((distance, -count, term))
        scored.sort()
        return [TermCount(term, -negative) for _, negative, term in scored[:n]]


def with_typos(queries: dict[str, str], rate: float, seed: int) -> dict[str, str]:
    """Each query, with probability `rate`, with one edit (drop, swap, double a letter) inside one of
    its Latin words of 5 letters or more, never the first letter."""
    rng = random.Random(seed)
    out = {}
    for qid, text in sorted(queries.items()):
        words = text.split(" ")
        long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isascii() and w.isalpha()]
        if long and rng.random() < rate:
            i = rng.choice(long)
            w = words[i]
            j = rng.randrange(1, len(w) - 1)
            edit = rng.choice(("drop", "swap", "double"))
            if edit == "drop":
                w = w[:j] + w[j + 1 :]
            elif edit == "swap":
                w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
            else:
                w = w[:j] + w[j] + w[j:]
            words[i] = w
        out[qid] = " ".join(words)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(folder: Path, split: str, gain: Callable[[float], float]) -> tuple[list[dict], dict[str, str], dict]:
    corpus = _read_jsonl(folder / "corpus.jsonl")
    queries = {q["_id"]: q["text"] for q in _read_jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, float]] = defaultdict(dict)
    with open(folder / f"qrels-{split}.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = gain(float(row["score"]))
    judged = {q: g for q, g in qrels.items() if q in queries and max(g.values()) > 0}
    return corpus, queries, judged


def ndcg10(ranked: list[str], gains: dict[str, float]) -> float:
    dcg = sum(gains.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(gains.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


class TantivyIndex:
    """A RAM tantivy index of pre-analysed fields, searched as the embedded store searches."""

    def __init__(self, docs: list[Fields], ids: list[str], boosts: dict[str, float]) -> None:
        import tantivy

        self.tantivy = tantivy
        builder = tantivy.SchemaBuilder()
        for name in boosts:
            builder.add_text_field(name, stored=False, tokenizer_name="whitespace")
        builder.add_unsigned_field("row", stored=True)
        self.schema = builder.build()
        self.boosts = boosts
        self.ids = ids
        index = tantivy.Index(self.schema)
        writer = index.writer(heap_size=200_000_000, num_threads=1)
        for row, fields in enumerate(docs):
            doc = tantivy.Document()
            for name in boosts:
                doc.add_text(name, " ".join(fields[name]))
            doc.add_unsigned("row", row)
            writer.add_document(doc)
        writer.commit()
        writer.wait_merging_threads()
        index.reload()
        self.searcher = index.searcher()

    def search(self, query: Fields, k: int = 100, fetch: int = 10) -> list[str]:
        tantivy = self.tantivy
        clauses = [
            (
                tantivy.Occur.Should,
                tantivy.Query.boost_query(tantivy.Query.term_query(self.schema, field, token), self.boosts[field]),
            )
            for field, tokens in query.items()
            for token in tokens
        ]
        if not clauses:
            return []
        hits = self.searcher.search(tantivy.Query.boolean_query(clauses), k).hits
        return [self.ids[self.searcher.doc(addr)["row"][0]] for _, addr in hits[:fetch]]


def evaluate(
    analysis: Analysis,
    corpus: list[dict],
    queries: dict[str, str],
    qrels: dict[str, dict[str, float]],
    fuzzy: VocabFuzzy | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    docs = [analysis.product(d["title"], d.get("text") or "") for d in corpus]
    analysed = time.perf_counter()
    index = TantivyIndex(docs, [d["_id"] for d in corpus], analysis.field_boosts)
    indexed = time.perf_counter()
    runs = {"": queries}
    if fuzzy is not None:
        runs["typos"] = {q: queries[q] + " " + " ".join(typo_corrections(fuzzy, queries[q])) for q in qrels}
    results = {
        name: [ndcg10(index.search(analysis.query(texts[q])), gains) for q, gains in qrels.items()]
        for name, texts in runs.items()
    }
    scores = results[""]
    done = time.perf_counter()
    if fuzzy is not None:
        changed = sum(runs["typos"][q].strip() != queries[q].strip() for q in qrels)
        return {
            "ndcg@10": round(sum(scores) / len(scores), 4),
            "ndcg@10 typo tolerance": round(sum(results["typos"]) / len(scores), 4),
            "queries expanded": changed,
            "queries": len(scores),
        }
    return {
        "ndcg@10": round(sum(scores) / len(scores), 4),
        "queries": len(scores),
        "analyse_s": round(analysed - start, 2),
        "index_s": round(indexed - analysed, 2),
        "search_s": round(done - indexed, 2),
    }


def bm25s_peer(corpus: list[dict], queries: dict[str, str], qrels: dict[str, dict[str, float]]) -> dict[str, Any]:
    import logging

    import bm25s
    import Stemmer

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    start = time.perf_counter()
    stemmer = Stemmer.Stemmer("english")
    texts = [(d["title"] + " " + (d.get("text") or "")).strip() for d in corpus]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stemmer=stemmer, stopwords="en", show_progress=False), show_progress=False)
    qids = list(qrels)
    tokens = bm25s.tokenize(
        [queries[q] for q in qids], stemmer=stemmer, stopwords="en", return_ids=False, show_progress=False
    )
    ndcgs = []
    for q, query in zip(qids, tokens, strict=True):
        ranked: list[str] = []
        if query:
            scores = retriever.get_scores(query)
            top = np.argpartition(-scores, 100)[:100]
            top = top[np.argsort(-scores[top], kind="stable")]
            ranked = [corpus[int(i)]["_id"] for i in top if scores[i] > 0]
        ndcgs.append(ndcg10(ranked, qrels[q]))
    return {
        "ndcg@10": round(sum(ndcgs) / len(ndcgs), 4),
        "queries": len(ndcgs),
        "total_s": round(time.perf_counter() - start, 2),
    }


def speed(titles: list[str], n: int, seed: int, module: Any = text_module) -> dict[str, Any]:
    """analyze_product docs/s: each qbqtc title with a 200-character description of other titles.

    `module`: a `middleware.text` (the current one, or an older one loaded from a file).
    """
    rng = random.Random(seed)
    docs = []
    for title in titles[:n]:
        description = ""
        while len(description) < 200:
            description += rng.choice(titles) + " "
        docs.append((title, description[:200]))
    module.analyze_product("预热", "预热 warm")  # loads jieba and the stemmer
    caches = [getattr(module, name) for name in ("_han_words", "stem", "pinyin_of") if hasattr(module, name)]

    def clear() -> None:
        for cache in caches:
            cache.cache_clear()

    clear()
    start = time.perf_counter()
    for title, body in docs:
        clear()
        module.analyze_product(title, body)
    cold = len(docs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for title, body in docs:
        module.analyze_product(title, body)
    warm = len(docs) / (time.perf_counter() - start)
    return {"docs": len(docs), "cold_docs_per_s": round(cold), "warm_docs_per_s": round(warm)}


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_text", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--speed-baseline: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--qbqtc-queries", type=int, default=4000, help="seeded sample of qbqtc queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="variant names separated by ; (default: all)")
    parser.add_argument("--speed-docs", type=int, default=3000)
    parser.add_argument(
        "--speed-baseline",
        type=Path,
        help="an older middleware/text.py to time beside the current one (git show REV:middleware/text.py > FILE)",
    )
    parser.add_argument("--skip-quality", action="store_true", help="only the analyze_product speed")
    parser.add_argument("--typo-rate", type=float, default=0.5, help="share of queries given one typo (typo rows)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    hd = load(args.data / "homedepot", "train", lambda s: s - 1.0)
    qb_corpus, qb_queries, qb_qrels = load(args.data / "qbqtc", "test", lambda s: s)
    sample = sorted(qb_qrels)
    random.Random(args.seed).shuffle(sample)
    qb_qrels = {q: qb_qrels[q] for q in sample[: args.qbqtc_queries]}
    qb = (qb_corpus, qb_queries, qb_qrels)

    wanted = {n.strip() for n in args.only.split(";") if n.strip()}
    variants = [v for v in VARIANTS if not wanted or v.name in wanted]
    if ANALYSIS not in [v.analysis for v in variants]:
        variants.append(Variant("chosen (middleware.text.ANALYSIS)", ANALYSIS))
    rows: list[dict[str, Any]] = []
    peer: dict[str, Any] = {}
    typo_rows: list[dict[str, Any]] = []
    if not args.skip_quality:
        print(f"{'variant':<36} {'homedepot':>9} {'qbqtc':>7}  seconds (analyse+index+search)")
        for variant in variants:
            row: dict[str, Any] = {"name": variant.name, "analysis": asdict(variant.analysis)}
            row["chosen"] = variant.analysis == ANALYSIS
            row["homedepot"] = evaluate(variant.analysis, *hd)
            row["qbqtc"] = evaluate(variant.analysis, *qb)
            rows.append(row)
            secs = "  ".join(
                f"{d}: {row[d]['analyse_s']}+{row[d]['index_s']}+{row[d]['search_s']}" for d in ("homedepot", "qbqtc")
            )
            mark = " *" if row["chosen"] else ""
            print(
                f"{variant.name + mark:<36} {row['homedepot']['ndcg@10']:>9.4f} {row['qbqtc']['ndcg@10']:>7.4f}  {secs}"
            )
        print("\ntypo tolerance, chosen analysis: nDCG@10 without / with")
        for dataset, (corpus, queries, qrels) in (("homedepot", hd), ("qbqtc", qb)):
            fuzzy = VocabFuzzy([d["title"] for d in corpus])
            for label, texts in (("as given", queries), ("with typos", with_typos(queries, args.typo_rate, args.seed))):
                got = evaluate(ANALYSIS, corpus, texts, qrels, fuzzy)
                typo_rows.append({"dataset": dataset, "queries_text": label, **got})
                print(
                    f"{dataset:<10} {label:<11} {got['ndcg@10']:.4f} / {got['ndcg@10 typo tolerance']:.4f}"
                    f"  ({got['queries expanded']} of {got['queries']} queries expanded)"
                )
        peer = bm25s_peer(*hd)
        print(f"{'bm25s + stem + stopwords (peer)':<36} {peer['ndcg@10']:>9.4f} {'-':>7}  homedepot: {peer['total_s']}")
    titles = [d["title"] for d in qb_corpus]
    modules = {"current": text_module}
    if args.speed_baseline:
        modules["baseline"] = _load_module(args.speed_baseline)
    timing: dict[str, dict[str, Any]] = {}
    for _ in range(2):  # interleaved rounds, the better of two: the machine is shared
        for name, module in modules.items():
            t = speed(titles, args.speed_docs, args.seed, module)
            best = timing.setdefault(name, t)
            for key in ("cold_docs_per_s", "warm_docs_per_s"):
                best[key] = max(best[key], t[key])
    if args.speed_baseline:
        timing["baseline"]["file"] = str(args.speed_baseline)
    for name, t in timing.items():
        print(
            f"analyze_product ({name}), qbqtc title + 200-char description: {t['cold_docs_per_s']} docs/s with"
            f" caches cleared per document, {t['warm_docs_per_s']} docs/s warm ({t['docs']} docs)"
        )
    report = {
        "analysis_version": ANALYSIS_VERSION,
        "chosen": asdict(ANALYSIS),
        "field_boosts": ANALYSIS.field_boosts,
        "queries": {"homedepot": len(hd[2]), "qbqtc": len(qb_qrels), "qbqtc_seed": args.seed},
        "variants": rows,
        "typo_tolerance": {"typo_rate": args.typo_rate, "rows": typo_rows},
        "bm25s_peer_homedepot": peer,
        "analyze_product_speed": timing,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
