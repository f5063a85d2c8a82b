"""`python -m benchmarks [--quick] [--only rerank,embed,sweep,gemm,gpu,service,index,lexical,storefront] [--output DIR]`

Runs every section in one process, on the same weights and inputs, and writes one JSON per section
plus SUMMARY.md to the output directory (default benchmarks/results, or benchmarks/results/quick
with --quick, so a smoke run never overwrites full-size figures).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SECTIONS = ("rerank", "gemm", "embed", "sweep", "gpu", "service", "index", "lexical", "storefront")
# sections other helpers own: module with `run(quick, output_dir) -> dict`
EXTERNAL = {
    "service": "benchmarks.service_bench",
    "index": "benchmarks.index_bench",
    "lexical": "benchmarks.lexical_bench",
    "storefront": "benchmarks.storefront_bench",
}

log = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few inputs (seconds)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--output", type=Path, default=None, help="directory for JSON and SUMMARY.md")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: usable cores)")
    parser.add_argument("--batch-size", type=int, default=32, help="model batch size (product default 32)")
    parser.add_argument(
        "--model-cache", type=Path, default=None, help="ONNX export cache (default: the product's model cache)"
    )
    args = parser.parse_args(argv)
    if args.only:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SECTIONS]
        if unknown or not chosen:
            parser.exit(2, f"--only: unknown section(s) {', '.join(unknown) or '(none)'}; choose from {SECTIONS}\n")
        args.sections = [s for s in SECTIONS if s in chosen]
    else:
        args.sections = list(SECTIONS)
    if args.threads is not None and args.threads < 1:
        parser.exit(2, "--threads must be at least 1\n")
    if args.batch_size < 1:
        parser.exit(2, "--batch-size must be at least 1\n")
    return args


def run_external(name: str, quick: bool, output_dir: Path) -> dict[str, Any]:
    try:
        module = importlib.import_module(EXTERNAL[name])
    except ImportError as err:
        return {"available": False, "reason": f"not available ({EXTERNAL[name]}: {err})"}
    if not hasattr(module, "run"):
        return {"available": False, "reason": f"not available ({EXTERNAL[name]} has no run(quick, output_dir))"}
    return {"available": True, "result": module.run(quick, output_dir)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    output_dir: Path = args.output or (common.DEFAULT_RESULTS / "quick" if args.quick else common.DEFAULT_RESULTS)
    threads = args.threads or common.default_threads()
    started = time.perf_counter()
    machine = common.machine_info()
    run_info = {
        "quick": args.quick,
        "sections": args.sections,
        "threads": threads,
        "batch_size": args.batch_size,
        "machine": machine,
    }
    log.info("machine: %s, %s cores; sections %s", machine["cpu_model"], machine["usable_cores"], args.sections)
    results: dict[str, Any] = {}
    needs_models = {"rerank", "embed", "sweep", "gpu"} & set(args.sections)
    models = common.prepare_models(args.quick) if needs_models else None
    if models is not None:
        run_info["models"] = {"reranker": str(models.reranker), "embedder": str(models.embedder)}
    section_kwargs = {"quick": args.quick, "cache_dir": args.model_cache}

    from benchmarks import embed_bench, gemm, gpu, rerank_bench, sweep

    for section in args.sections:
        t0 = time.perf_counter()
        log.info("section %s", section)
        if section == "rerank":
            assert models is not None
            results["rerank"] = rerank_bench.run(models, threads=threads, batch_size=args.batch_size, **section_kwargs)
        elif section == "gemm":
            counts = [64] if args.quick else [256, 1024]
            if "rerank" in results:
                batch_tokens = round(args.batch_size * results["rerank"]["mean_pair_tokens"])
                counts = sorted({*counts, batch_tokens})
            results["gemm"] = gemm.run(counts, threads=threads, quick=args.quick)
            if "rerank" in results:
                results["rerank"]["effective_vs_gemm"] = rerank_bench.effective_fraction(
                    results["rerank"], results["gemm"]
                )
                common.write_json(output_dir, "rerank", {"run": run_info, "rerank": results["rerank"]})
        elif section == "embed":
            assert models is not None
            results["embed"] = embed_bench.run(models, threads=threads, batch_size=args.batch_size, **section_kwargs)
        elif section == "sweep":
            assert models is not None
            results["sweep"] = sweep.run(models, threads=threads, default_batch_size=args.batch_size, **section_kwargs)
        elif section == "gpu":
            assert models is not None
            results["gpu"] = gpu.run(models, **section_kwargs)
        else:
            results[section] = run_external(section, args.quick, output_dir)
        log.info("section %s done in %.0f s", section, time.perf_counter() - t0)
        results[section]["section_seconds"] = round(time.perf_counter() - t0, 1)
        common.write_json(output_dir, section, {"run": run_info, section: results[section]})

    run_info["total_seconds"] = round(time.perf_counter() - started, 1)
    run_info["load_average_at_end"] = list(__import__("os").getloadavg())
    common.write_json(output_dir, "run", {"run": run_info, "sections": list(results)})
    from benchmarks.summary import write_summary

    path = write_summary(output_dir, run_info, results)
    print(path.read_text())
    print(f"results in {output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
