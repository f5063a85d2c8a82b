"""Clicks to a better reranker, simulated on Home Depot judgments (real all-MiniLM-L6-v2 weights, CPU).

    python -m benchmarks.tuning.click_simulation [--train-queries 1500] [--heldout-queries 400]
        [--sessions 20] [--steps 250] [--serve hybrid|bm25] [--runs DIR] [--seed 42]

1. Queries with judgments are split BY QUERY (seeded) into train and held-out.
2. The product serves each train query: its own pipeline (hybrid RRF of BM25 and all-MiniLM-L6-v2
   over the embedded store holding the whole corpus, no reranker, no business scoring), top 10.
3. Shoppers are simulated with a dependent-click cascade: they scan top-down; a product they examine
   is clicked with a probability set by its judged grade (unjudged products: a low one); after a
   click they go on with probability `--continue-after-click`, else with `--continue-after-skip`;
   some clicks add to cart and purchase. Only what a shop would log is written: `QueryRecord`s and
   `Event`s as the export's queries.jsonl + events.jsonl.
4. `shopsearch tune make-pairs --from-events` turns them into pairs twice: position-bias corrected
   (IPW scores, skip-above negatives) and uncorrected (raw CTR, every unclicked product a negative).
5. `shopsearch tune train-reranker` trains a cross-encoder from the MiniLM base on each, only on
   those pairs, with the same budget.
6. Held-out queries: the served top `--rerank-k` reranked by each model; nDCG@10 (gain = grade − 1,
   global judgments) against the served ranking and against the base model's own scores (the
   bi-encoder's cosine), with paired randomisation tests.

Writes benchmarks/results/clicks.json and CLICKS.md; weights, stores and logs go to --runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from middleware.cli import main as shopsearch
from middleware.evaluation.metrics import ndcg_at_k
from middleware.evaluation.significance import compare
from middleware.events.model import Event, QueryRecord
from middleware.tuning.data import load_corpus, load_qrels, load_queries, split_by_query

log = logging.getLogger("click_simulation")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BASE = "sentence-transformers/all-MiniLM-L6-v2"
GAIN = "score-1"  # homedepot grades 1–3: grade 1 gains nothing


@dataclass
class ClickModel:
    """Dependent click model: P(click | examined) from the grade, cascade continuation probabilities."""

    unjudged: float = 0.05
    floor: float = 0.02
    top: float = 0.9
    continue_after_skip: float = 0.8
    continue_after_click: float = 0.45
    cart_given_click: float = 0.35  # × (grade − 1) / 2
    purchase_given_cart: float = 0.5

    def attractiveness(self, grade: float | None) -> float:
        if grade is None:
            return self.unjudged
        return self.floor + self.top * ((grade - 1.0) / 2.0) ** 2


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ serving


def corpus_vectors(embedder: Any, ids: list[str], texts: list[str], cache: Path) -> np.ndarray:
    digest = hashlib.sha1("\n".join(f"{i}\t{t}" for i, t in zip(ids, texts, strict=True)).encode()).hexdigest()
    meta = {"model_id": embedder.model_id, "corpus": digest, "rows": len(ids)}
    meta_path = cache.with_suffix(".json")
    if cache.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return np.load(cache)
    started = time.perf_counter()
    chunks = []
    for start in range(0, len(texts), 4096):
        chunks.append(np.asarray(embedder.encode_documents(texts[start : start + 4096]), np.float32))
        log.info("embedded %d/%d products", min(start + 4096, len(texts)), len(texts))
    vectors = np.concatenate(chunks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    meta_path.write_text(json.dumps(meta))
    log.info("embedded the corpus in %.0f s", time.perf_counter() - started)
    return vectors


def serve(args: argparse.Namespace, corpus: Any, queries: dict[str, str], query_ids: list[str], depth: int) -> dict:
    """The product's own ranking for each query: {qid: [product ids]}, cached under --runs."""
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.config import Settings
    from middleware.models.embedder import Embedder
    from middleware.pipeline import Pipeline
    from middleware.products import Product
    from middleware.schema import SearchRequest

    runs = Path(args.runs)
    key = hashlib.sha1(f"{args.serve}|{depth}|{','.join(query_ids)}".encode()).hexdigest()[:12]
    cached = runs / f"served-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    hybrid = args.serve == "hybrid"
    embedder = Embedder(BASE, threads=args.threads) if hybrid else None
    store = runs / f"store-{args.serve}"
    dim = embedder.dim if embedder is not None else None
    marker = store / "sim-store.json"
    if not marker.is_file():
        vectors = corpus_vectors(embedder, corpus.ids, corpus.texts, runs / "corpus-minilm.npy") if hybrid else None
        backend = EmbeddedBackend(store, dim=dim)
        started = time.perf_counter()
        for start in range(0, len(corpus.ids), 2000):
            ids = corpus.ids[start : start + 2000]
            products = []
            for doc_id, text in zip(ids, corpus.texts[start : start + len(ids)], strict=True):
                title, _, description = text.partition("\n")  # document_text: title, then description
                products.append(Product(id=doc_id, title=title or doc_id, description=description or None))
            backend.upsert(products, vectors[start : start + len(ids)] if vectors is not None else None)
        backend.close()
        marker.write_text(json.dumps({"products": len(corpus.ids), "seconds": round(time.perf_counter() - started, 1)}))
    settings = Settings(
        backend="embedded",
        data_dir=store,
        embedder=BASE if hybrid else "none",
        reranker="none",
        deadline_ms=600_000,
        max_deadline_ms=600_000,
        threads=args.threads,
    )
    pipeline = Pipeline(settings, EmbeddedBackend(store, dim=dim), embedder)
    served: dict[str, list[str]] = {}
    try:
        for n, qid in enumerate(query_ids, 1):
            request = SearchRequest(
                query=queries[qid],
                size=depth,
                retrieval="hybrid" if hybrid else "bm25",
                rerank=False,
                business_enabled=False,
                deadline_ms=600_000,
            )
            served[qid] = [hit.id for hit in pipeline.search(request).hits]
            if n % 500 == 0:
                log.info("served %d/%d queries", n, len(query_ids))
    finally:
        pipeline.close()
    cached.write_text(json.dumps(served))
    return served


# ------------------------------------------------------------------------------------------ shoppers


def simulate(
    served: dict[str, list[str]],
    queries: dict[str, str],
    qrels: dict[str, dict[str, float]],
    model: ClickModel,
    sessions: int,
    seed: int,
    swap_share: float = 0.0,
) -> tuple[list[QueryRecord], list[Event], dict[str, Any]]:
    """Sessions over the served pages; a `swap_share` of searches shows one random adjacent pair of the
    top 10 swapped (randomised traffic that lets propensities be harvested)."""
    rng = random.Random(seed)
    records: list[QueryRecord] = []
    events: list[Event] = []
    examined_at: np.ndarray = np.zeros(10)
    shown_at: np.ndarray = np.zeros(10)
    clicks = 0
    clock = datetime(2026, 11, 1, tzinfo=UTC)
    swapped = 0
    for qid, hits in served.items():
        for s in range(sessions):
            page = hits[:10]
            if swap_share and len(page) > 1 and rng.random() < swap_share:
                k = rng.randrange(len(page) - 1)
                page = [*page[:k], page[k + 1], page[k], *page[k + 2 :]]
                swapped += 1
            clock += timedelta(seconds=7)
            session = f"{qid}-{s}"
            query_id = f"{session}-q"
            records.append(
                QueryRecord(
                    query_id=query_id,
                    timestamp=clock,
                    query=queries[qid],
                    hit_ids=page,
                    total=len(hits),
                    session_id=session,
                    user_id=f"u{rng.randrange(10**6)}",
                )
            )
            shown_at[: len(page)] += 1
            for position, object_id in enumerate(page, 1):
                examined_at[position - 1] += 1
                grade = qrels[qid].get(object_id)
                clicked = rng.random() < model.attractiveness(grade)
                if clicked:
                    clicks += 1
                    when = clock + timedelta(seconds=position)
                    common = {"query_id": query_id, "object_id": object_id, "position": position, "session_id": session}
                    events.append(Event(action="click", timestamp=when, **common))
                    cart = model.cart_given_click * ((grade - 1.0) / 2.0 if grade is not None else 0.05)
                    if rng.random() < cart:
                        events.append(Event(action="add_to_cart", timestamp=when + timedelta(seconds=1), **common))
                        if rng.random() < model.purchase_given_cart:
                            events.append(Event(action="purchase", timestamp=when + timedelta(seconds=2), **common))
                go_on = model.continue_after_click if clicked else model.continue_after_skip
                if rng.random() >= go_on:
                    break
    truth = {
        "examination_by_position": {
            p + 1: round(float(e / max(s, 1)), 4) for p, (e, s) in enumerate(zip(examined_at, shown_at, strict=True))
        },
        "searches": len(records),
        "swapped_searches": swapped,
        "clicks": clicks,
        "events": len(events),
    }
    return records, events, truth


def write_export(directory: Path, records: list[QueryRecord], events: list[Event]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.model_dump_json(by_alias=True) + "\n")
    with (directory / "events.jsonl").open("w", encoding="utf-8") as fh:
        for event in events:
            fh.write(event.model_dump_json() + "\n")


# ------------------------------------------------------------------------------------------ models


def run_cli(argv: list[str]) -> None:
    log.info("shopsearch %s", " ".join(argv))
    code = shopsearch(argv)
    if code != 0:
        raise SystemExit(f"shopsearch {' '.join(argv)} exited {code}")


def cross_encoder_scores(model_dir: Path, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(str(model_dir), num_labels=1, max_length=max_length, device="cpu")
    return np.asarray(model.predict(pairs, batch_size=64, show_progress_bar=False), dtype=np.float64)


def cosine_scores(model: str, pairs: list[tuple[str, str]], threads: int) -> np.ndarray:
    """Cosine of query and product under an embedder (the base, or a fine-tuned directory loaded the way
    the product loads it)."""
    from middleware.models.embedder import Embedder

    embedder = Embedder(model, threads=threads) if model == BASE else Embedder(model, runtime="torch", device="cpu")
    queries = [a for a, _ in pairs]
    docs = [b for _, b in pairs]
    unique = list(dict.fromkeys(queries))
    row = {text: i for i, text in enumerate(unique)}
    q = np.asarray(embedder.encode_queries(unique), np.float64)[[row[text] for text in queries]]
    d = np.asarray(embedder.encode_documents(docs), np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.sum(q * d, axis=1)


def rerank(candidates: dict[str, list[str]], scores: np.ndarray) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    offset = 0
    for qid, ids in candidates.items():
        chunk = scores[offset : offset + len(ids)]
        offset += len(ids)
        order = sorted(range(len(ids)), key=lambda i: (-chunk[i], i))  # ties keep the served order
        out[qid] = [ids[i] for i in order]
    return out


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "homedepot"))
    p.add_argument("--runs", default=os.environ.get("RUNS", "/tmp/shopsearch-click-sim"))
    p.add_argument("--serve", choices=["hybrid", "bm25"], default="hybrid")
    p.add_argument("--train-queries", type=int, default=1000)
    p.add_argument("--heldout-queries", type=int, default=400)
    p.add_argument("--sessions", type=int, default=20, help="shopper sessions per train query")
    p.add_argument("--rerank-k", type=int, default=20, help="held-out candidates reranked (served top K)")
    p.add_argument("--models", default="embedder,reranker", help="what to train, in order (embedder,reranker)")
    p.add_argument("--embedder-steps", type=int, default=40, help="embedder training steps")
    p.add_argument("--embedder-group", type=int, default=3, help="1 positive + N-1 negatives per group")
    p.add_argument("--reranker-steps", type=int, default=100, help="reranker training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=40, help="reranker tokens per (query, product)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--continue-after-skip", type=float, default=ClickModel.continue_after_skip)
    p.add_argument("--continue-after-click", type=float, default=ClickModel.continue_after_click)
    p.add_argument("--swap-share", type=float, default=0.0, help="share of searches with an adjacent pair swapped")
    p.add_argument("--propensities", choices=["ctr", "harvest"], default="harvest", help="for the corrected pairs")
    p.add_argument("--min-clicks", type=int, default=1, help="engaged searches a corrected positive needs")
    p.add_argument("--variants", default="corrected,uncorrected", help="pairs variants to build and train")
    p.add_argument("--output", default=str(RESULTS / "clicks.json"))
    p.add_argument("--report", default=str(RESULTS / "CLICKS.md"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data = Path(args.data)
    corpus = load_corpus(data / "corpus.jsonl")
    queries = load_queries(data / "queries.jsonl")
    qrels = load_qrels(data / "qrels-train.tsv")
    judged = [q for q in qrels if q in queries and any(s >= 2.5 for s in qrels[q].values())]
    pool, _ = split_by_query(judged, 0.0, args.seed)
    random.Random(args.seed).shuffle(pool)
    train_ids = sorted(pool[: args.train_queries])
    heldout_ids = sorted(pool[args.train_queries : args.train_queries + args.heldout_queries])
    assert not set(train_ids) & set(heldout_ids)

    t = time.perf_counter()
    served = serve(args, corpus, queries, train_ids + heldout_ids, max(10, args.rerank_k))
    timings["serve_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = ClickModel(continue_after_skip=args.continue_after_skip, continue_after_click=args.continue_after_click)
    train_served = {q: served[q] for q in train_ids}
    records, events, truth = simulate(train_served, queries, qrels, model, args.sessions, args.seed, args.swap_share)
    export = runs / "export"
    write_export(export, records, events)
    timings["simulate_s"] = time.perf_counter() - t

    catalog = str(data / "corpus.jsonl")
    variants = {
        "corrected": ["--correction", "ipw", "--propensities", args.propensities, "--min-clicks", str(args.min_clicks)],
        "uncorrected": ["--correction", "none", "--no-skip-above"],
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    summaries: dict[str, Any] = {}
    for name, flags in variants.items():
        t = time.perf_counter()
        out = runs / f"pairs-{name}"
        pairs_argv = ["tune", "make-pairs", "--from-events", str(export), "--catalog", catalog]
        run_cli([*pairs_argv, "--output-dir", str(out), "--dev-fraction", "0", *flags])
        summaries[name] = json.loads((out / "pairs_summary.json").read_text())
        timings[f"pairs_{name}_s"] = time.perf_counter() - t

    # held-out: the served top K, reordered by each model
    candidates = {q: served[q][: args.rerank_k] for q in heldout_ids if served[q]}
    qids = sorted(candidates)
    text_of = dict(zip(corpus.ids, corpus.texts, strict=True))
    flat = [(queries[q], text_of[d]) for q, ids in candidates.items() for d in ids]
    ndcg: dict[str, np.ndarray] = {}

    def score(name: str, ranking: dict[str, list[str]]) -> None:
        ndcg[name] = np.array([ndcg_at_k(ranking[q], qrels[q], 10, GAIN) for q in qids])
        log.info("held-out nDCG@10 %s: %.4f", name, ndcg[name].mean())

    kinds = [m for m in args.models.split(",") if m and m != "none"]
    score("served", candidates)
    if kinds:  # --models none: the log and its pairs only (e.g. to study the propensities)
        t = time.perf_counter()
        score("base-embedder", rerank(candidates, cosine_scores(BASE, flat, args.threads)))
        timings["heldout_base_s"] = time.perf_counter() - t
    result: dict[str, Any] = {
        "command": "python -m benchmarks.tuning.click_simulation " + " ".join(sys.argv[1:] if argv is None else argv),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(data),
        "sizes": {
            "corpus_products": len(corpus.ids),
            "train_queries": len(train_ids),
            "heldout_queries": len(qids),
            "sessions_per_query": args.sessions,
            "rerank_k": args.rerank_k,
            "embedder": {
                "steps": args.embedder_steps,
                "batch_size": args.batch_size,
                "group_size": args.embedder_group,
                "max_length": 32,
            },
            "reranker": {"steps": args.reranker_steps, "batch_size": args.batch_size, "max_length": args.max_length},
        },
        "serving": ("hybrid: RRF of BM25 and " + BASE if args.serve == "hybrid" else "BM25")
        + ", the embedded store holding the whole corpus, top 10 shown",
        "click_model": asdict(model),
        "swap_share": args.swap_share,
        "propensity_method": args.propensities,
        "corrected_min_clicks": args.min_clicks,
        "simulated": truth,
        "pairs": {
            name: {
                k: summaries[name][k]
                for k in ("records", "positives", "negatives", "judged", "untrusted", "propensities", "ctr_by_position")
            }
            for name in variants
        },
    }
    for kind in kinds:
        for name in variants:
            t = time.perf_counter()
            model_dir = runs / f"{kind}-{name}"
            pairs = str(runs / f"pairs-{name}" / "train.jsonl")
            train = [f"train-{kind}", "--input", pairs, "--output-dir", str(model_dir), "--base", BASE]
            train += ["--batch-size", str(args.batch_size), "--save-steps", "100000", "--logging-steps", "10"]
            train += ["--seed", str(args.seed)]
            if kind == "embedder":
                train += [
                    "--max-steps",
                    str(args.embedder_steps),
                    "--group-size",
                    str(args.embedder_group),
                    "--lr",
                    "5e-5",
                ]
                train += ["--temperature", "0.02", "--max-length", "32"]
            else:
                train += ["--max-steps", str(args.reranker_steps), "--labels", "binary", "--negatives-per-query", "5"]
                train += ["--lr", "7e-5", "--max-length", str(args.max_length)]
            run_cli(["tune", *train])
            timings[f"train_{kind}_{name}_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if kind == "embedder":
                scores = cosine_scores(str(model_dir), flat, args.threads)
            else:
                scores = cross_encoder_scores(model_dir, flat, args.max_length)
            score(f"{kind}-{name}", rerank(candidates, scores))
            timings[f"heldout_{kind}_{name}_s"] = time.perf_counter() - t
            write_results(result, ndcg, timings, started, args)
    write_results(result, ndcg, timings, started, args)
    print(report(result))
    return 0


COMPARISONS: tuple[tuple[str, str], ...] = (
    ("embedder-corrected", "base-embedder"),
    ("embedder-corrected", "served"),
    ("embedder-uncorrected", "base-embedder"),
    ("embedder-corrected", "embedder-uncorrected"),
    ("reranker-corrected", "served"),
    ("reranker-corrected", "base-embedder"),
    ("reranker-uncorrected", "served"),
    ("reranker-corrected", "reranker-uncorrected"),
    ("base-embedder", "served"),
)


def write_results(
    result: dict[str, Any], ndcg: dict[str, np.ndarray], timings: dict[str, float], started: float, args: Any
) -> None:
    """Figures so far (rewritten after each model, so a run cut short keeps what it measured)."""
    result["uptime"] = uptime()
    result["ndcg@10"] = {m: round(float(v.mean()), 4) for m, v in ndcg.items()}
    result["comparisons"] = [
        compare("ndcg@10", a, ndcg[a], b, ndcg[b], seed=args.seed).to_dict()
        for a, b in COMPARISONS
        if a in ndcg and b in ndcg
    ]
    timings["total_s"] = time.perf_counter() - started
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    Path(args.report).write_text(report(result))


def report(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    emb, rr = sizes["embedder"], sizes["reranker"]
    lines = [
        "# Clicks to training data: the simulation",
        "",
        f"`{result['command']}` — {result['when']}, load: `{result['uptime']}`",
        "",
        f"Home Depot judgments, {sizes['corpus_products']:,} products. {sizes['train_queries']} train queries "
        "served by "
        f"{result['serving']}; {sizes['sessions_per_query']} simulated shopper sessions each "
        f"({result['simulated']['searches']:,} searches, {result['simulated']['clicks']:,} clicks, "
        f"{result['simulated']['events']:,} events). Trained only on the click pairs, from {BASE}: the embedder "
        f"{emb['steps']} steps × {emb['batch_size']} groups of {emb['group_size']} (1 positive, the rest click "
        f"negatives; in-batch negatives too), max length {emb['max_length']}; the reranker (a fresh one-logit head) "
        f"{rr['steps']} steps × "
        f"{rr['batch_size']} pairs, max length {rr['max_length']}. Held-out: {sizes['heldout_queries']} other queries, "
        f"the served top {sizes['rerank_k']} reordered by each model; "
        "nDCG@10 with gain = grade − 1 against all their judgments.",
        "",
        "| ranking | nDCG@10 |",
        "|---|---:|",
    ]
    lines += [f"| {m} | {v:.4f} |" for m, v in result["ndcg@10"].items()]
    lines += ["", "| comparison | Δ nDCG@10 | 95% CI | p (paired randomisation) |", "|---|---:|---:|---:|"]
    for c in result["comparisons"]:
        ci = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
        lines.append(f"| {c['mode_a']} − {c['mode_b']} | {c['mean_diff']:+.4f} | {ci} | {c['p_value']:.4f} |")
    truth = result["simulated"]["examination_by_position"]
    est = result["pairs"]["corrected"]["propensities"]
    ctr_est = result["pairs"].get("uncorrected", result["pairs"]["corrected"])["propensities"]  # the CTR ratio
    lines += [
        "",
        f"Position propensities estimated from the log (swapped adjacent pairs in {result.get('swap_share', 0.0):.0%} "
        "of searches) vs the simulation's true examination rate:",
        "",
        "| position | " + " | ".join(str(p) for p in truth) + " |",
        "|---" * (len(truth) + 1) + "|",
        f"| estimated θ, corrected pairs ({result.get('propensity_method', 'ctr')}) | "
        + " | ".join(f"{est.get(str(p), est.get(p, float('nan'))):.3f}" for p in truth)
        + " |",
        "| estimated θ, CTR ratio | "
        + " | ".join(f"{ctr_est.get(str(p), ctr_est.get(p, float('nan'))):.3f}" for p in truth)
        + " |",
        "| true examination | " + " | ".join(f"{v:.3f}" for v in truth.values()) + " |",
        "",
        "Pairs: "
        + "; ".join(
            f"{name}: {p['records']} queries, {p['positives']} positives, {p['negatives']} negatives, "
            f"{p['judged']} judged"
            for name, p in result["pairs"].items()
        ),
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
