"""SUMMARY.md: one readable page of the run, with the targets and whether they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import RANDOM_WEIGHTS_NOTE
from benchmarks.common import markdown_table


def targets(results: dict[str, Any]) -> list[tuple[str, str, Any, bool | None]]:
    """(target, measured as, value, holds)."""
    rows: list[tuple[str, str, Any, bool | None]] = []
    rerank = results.get("rerank")
    if rerank:
        k = rerank["top_ks"][0]
        runners = rerank["runners"]
        int8 = runners.get("ours ONNX INT8", {}).get(f"top{k}", {})
        fp32 = runners.get("ours ONNX FP32", {}).get(f"top{k}", {})
        ratio = int8.get("ratio_to_fastest_library_peer")
        rows.append((f"rerank ≥ 3× faster peer (top-{k})", "INT8 pairs/s ÷ fastest peer", ratio, _ge(ratio, 3.0)))
        overlap = int8.get("top10_overlap_vs_torch_fp32_mean")
        rows.append(("INT8 top-10 agreement ≥ 0.9", "mean top-10 overlap vs torch FP32", overlap, _ge(overlap, 0.9)))
        delta = (
            max(
                (v.get(f"top{kk}", {}).get("max_abs_delta_vs_torch_fp32") or 0.0)
                for kk in rerank["top_ks"]
                for name, v in runners.items()
                if name == "ours ONNX FP32"
            )
            if fp32
            else None
        )
        rows.append(("FP32 max|Δscore| ≤ 1e-3", "max over all sets, sigmoid scores", delta, _le(delta, 1e-3)))
        eff = rerank.get("effective_vs_gemm", {}).get(f"ours ONNX INT8 top{k}", {}).get("fraction")
        rows.append(("effective FLOP/s ≥ 60% of GEMM", f"INT8 top-{k} vs INT8 layer GEMM", eff, _ge(eff, 0.6)))
        pad = next(iter(rerank["padding"]["ratios"].values()))
        rows.append(("padding ≤ 1.1× real tokens", "ours, all rerank sets", pad, _le(pad, 1.1)))
    embed = results.get("embed")
    if embed:
        for name in ("ours ONNX FP32", "ours ONNX INT8"):
            ratio = embed["runners"].get(name, {}).get("ratio_to_sentence_transformers")
            rows.append((f"embedding ≥ 1.5× sentence-transformers ({name})", "docs/s ratio", ratio, _ge(ratio, 1.5)))
    return rows


def _ge(v: float | None, bound: float) -> bool | None:
    return None if v is None else v >= bound


def _le(v: float | None, bound: float) -> bool | None:
    return None if v is None else v <= bound


def _holds(v: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[v]


def write_summary(output_dir: Path, run_info: dict[str, Any], results: dict[str, Any]) -> Path:
    m = run_info["machine"]
    lines = [
        "# shopsearch benchmarks",
        "",
        f"**Note: {RANDOM_WEIGHTS_NOTE}.**",
        "",
        f"- Machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({', '.join(m['cpu_flags'])}), "
        f"{m['memory_gb']} GB; load average at start {m['load_average_at_start']}, at end "
        f"{run_info.get('load_average_at_end')} (shared machine: compare within this run only)",
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v),
        f"- Run: quick={run_info['quick']}, threads={run_info['threads']}, batch size {run_info['batch_size']}, "
        f"{run_info.get('total_seconds')} s in all",
        "",
    ]
    rows = targets(results)
    if rows:
        lines += [
            "## Targets",
            "",
            markdown_table(
                ["target", "measured as", "value", "holds"], [(t, how, v, _holds(ok)) for t, how, v, ok in rows]
            ),
            "",
        ]
    rerank = results.get("rerank")
    if rerank:
        ks = rerank["top_ks"]
        model = "bge-reranker-v2-m3 architecture (XLM-R large, 24×1024)" if rerank["full_size"] else "tiny XLM-R"
        lines += [
            "## Rerank",
            "",
            f"Model: {model}; "
            f"sets per top-K: {rerank['sets_per_top_k']}; mean pair length {rerank['mean_pair_tokens']:.1f} tokens. "
            "Reference for agreement: torch eager FP32. Ratio: pairs/s ÷ the faster of CrossEncoder / FlagReranker.",
            "",
        ]
        headers = ["runner"]
        for k in ks:
            headers += [
                f"top-{k} pairs/s",
                f"top-{k} latency s",
                f"top-{k} ratio",
                f"top-{k} max|Δ|",
                f"top-{k} top-10 overlap",
            ]
        table = []
        for name, v in rerank["runners"].items():
            if "error" in v:
                table.append([name, f"failed: {v['error']}"] + [None] * (len(headers) - 2))
                continue
            row: list[Any] = [name]
            for k in ks:
                r = v.get(f"top{k}", {})
                row += [
                    r.get("pairs_per_s"),
                    r.get("latency_median_s"),
                    r.get("ratio_to_fastest_library_peer"),
                    r.get("max_abs_delta_vs_torch_fp32"),
                    r.get("top10_overlap_vs_torch_fp32_mean"),
                ]
            table.append(row)
        lines += [markdown_table(headers, table), ""]
        notes = [f"- {n}: {v['note']}" for n, v in rerank["runners"].items() if v.get("note")]
        notes.append(f"- FP16: {rerank['fp16']}")
        probes = ", ".join(f"{n} {v.get('machine_probe_gflops_before')}" for n, v in rerank["runners"].items())
        notes.append(f"- Machine drift probe (torch FP32 GEMM GFLOP/s before each runner): {probes}")
        lines += [*notes, "", "Token lengths (pairs, our tokenizer):", ""]
        lines += [
            markdown_table(
                ["set", "n", "mean", "p10", "p50", "p90", "max"],
                [
                    [name, s["n"], s["mean"], s["p10"], s["p50"], s["p90"], s["max"]]
                    for name, s in rerank["token_lengths"].items()
                ],
            ),
            "",
        ]
        eff = rerank.get("effective_vs_gemm")
        if eff:
            lines += [
                f"Effective FLOP/s (real tokens only) vs the same-run layer GEMM at {eff['gemm_tokens_used']} tokens "
                f"(one batch ≈ {eff['batch_tokens']} tokens):",
                "",
                markdown_table(
                    ["run", "effective GFLOP/s", "GEMM GFLOP/s", "fraction"],
                    [
                        [k, v["effective_gflops"], v["gemm_gflops"], v["fraction"]]
                        for k, v in eff.items()
                        if isinstance(v, dict)
                    ],
                ),
                "",
            ]
        pad = rerank["padding"]
        lines += [
            f"Padding (tokens computed ÷ {pad['real_tokens']} real tokens):",
            "",
            markdown_table(["batching", "ratio"], list(pad["ratios"].items())),
            "",
        ]
    g = results.get("gemm")
    if g:
        counts = [str(t) for t in g["token_counts"]]
        lines += [
            f"## Machine limit: GFLOP/s of one large layer's weight products ({g['threads']} threads, median)",
            "",
            markdown_table(
                ["runtime", *[f"T={t}" for t in counts]],
                [[name, *[r[t]["gflops_median"] for t in counts]] for name, r in g["rates"].items()],
            ),
            "",
        ]
    e = results.get("embed")
    if e:
        lines += [
            f"## Embedding ({'bge-large-zh-v1.5 architecture' if e['full_size'] else 'tiny BERT'}, "
            f"{e['docs']} titles, mean {e['token_lengths']['mean']} tokens)",
            "",
            markdown_table(
                ["runner", "docs/s", "ratio to sentence-transformers", "min cosine vs ST"],
                [
                    [
                        n,
                        v["docs_per_s"],
                        v["ratio_to_sentence_transformers"],
                        v.get("min_cosine_vs_sentence_transformers"),
                    ]
                    for n, v in e["runners"].items()
                ],
            ),
            "",
        ]
    s = results.get("sweep")
    if s:
        lines += [
            f"## Threads × batch size (reranker top-{s['top_k']}, embedder {s['embed_docs']} titles)",
            "",
            markdown_table(
                ["model", "precision", "threads", "batch", "items/s"],
                [[r["model"], r["precision"], r["threads"], r["batch_size"], r["items_per_s"]] for r in s["rows"]],
            ),
            "",
        ]
        for name, b in s["best"].items():
            best = b["best"]
            lines.append(
                f"- {name}: best threads={best['threads']} batch={best['batch_size']}; "
                f"the default reaches {b['default_vs_best']:.0%} of it"
                if b["default_vs_best"]
                else f"- {name}: best {best}"
            )
        lines.append("")
        ov = s.get("batch_overhead")
        if ov:
            ks = sorted({r["top_k"] for r in ov["rows"]}, reverse=True)
            precisions = sorted({r["precision"] for r in ov["rows"]}, reverse=True)
            by = {(r["precision"], r["top_k"], r["overhead_tokens"]): r["pairs_per_s"] for r in ov["rows"]}
            lines += [
                f"Batch cuts (reranker pairs/s): fixed chunks vs `plan_batches` with a per-batch overhead of N "
                f"tokens; product default {ov['default_overhead_tokens']}:",
                "",
                markdown_table(
                    ["precision", "top-K", *[("fixed chunks" if o is None else f"plan, {o}") for o in ov["settings"]]],
                    [[p, k, *[by.get((p, k, o)) for o in ov["settings"]]] for p in precisions for k in ks],
                ),
                "",
            ]
    gp = results.get("gpu")
    if gp:
        lines += ["## GPU", ""]
        if gp.get("skipped"):
            lines += [f"Skipped: {gp['reason']}.", ""]
        else:
            lines += ["```json", json.dumps(gp, indent=2, default=str), "```", ""]
    for name in ("service", "index", "lexical", "storefront"):
        part = results.get(name)
        if part:
            lines += [f"## {name.capitalize()}", ""]
            if not part.get("available"):
                lines += [f"{part['reason']}.", ""]
            else:
                lines += ["```json", json.dumps(part["result"], indent=2, default=str)[:4000], "```", ""]
    path = output_dir / "SUMMARY.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
