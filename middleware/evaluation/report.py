"""Evaluation output: a terminal table, the JSON document, and a PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from middleware.evaluation.metrics import METRIC_NAMES

TABLE_METRICS: tuple[str, ...] = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10")
CHART_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(results: dict[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One row per (pool, mode): quality metrics, then median and p95 latency per query."""
    header = ["pool", "mode", *metrics, "p50 ms", "p95 ms", "queries"]
    rows: list[list[str]] = []
    modes = list(results.get("results", {}))
    for pool in results.get("settings", {}).get("pools", []):
        for mode in modes:
            cell = results["results"][mode].get(pool)
            if cell is None:
                continue
            latency = cell.get("latency_ms", {})
            rows.append(
                [
                    pool,
                    mode,
                    *(_fmt(cell.get(m)) for m in metrics),
                    _fmt(latency.get("median"), 2),
                    _fmt(latency.get("p95"), 2),
                    str(cell.get("queries", "-")),
                ]
            )
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(lines)


def format_summary(results: dict[str, Any]) -> str:
    """The table plus what was evaluated, what was skipped and why, and significance tests."""
    q = results.get("queries", {})
    pools = results.get("pools", {})
    out = [
        f"dataset {results['dataset']['name']} (split {results['dataset']['split']}): "
        f"{results['dataset']['documents']} documents; {q.get('selected')} queries selected "
        f"({q.get('selection')}), {q.get('evaluated')} evaluated, {q.get('skipped_no_relevant')} skipped "
        f"(no judged document with score >= {results['settings']['relevant_min']})",
        "pools: " + ", ".join(f"{name} = {info['documents']} documents" for name, info in pools.items()),
        "",
        format_table(results),
    ]
    for mode, cells in results.get("results", {}).items():
        for pool, cell in cells.items():
            if cell.get("failed_queries") or cell.get("degraded_queries"):
                out.append(
                    f"warning: {mode} on {pool}: {cell.get('failed_queries', 0)} failed, "
                    f"{cell.get('degraded_queries', 0)} degraded searches {cell.get('first_error') or ''}".rstrip()
                )
    skipped = results.get("skipped_modes", {})
    if skipped:
        out.append("")
        out.extend(f"not measured: {mode}: {reason}" for mode, reason in skipped.items())
    tests = results.get("significance", [])
    if tests:
        out.append("")
        out.append("paired tests (randomisation p-value, bootstrap 95% interval of the mean difference):")
        for t in tests:
            out.append(
                f"  {t['pool']:<6} {t['metric']:<10} {t['mode_a']} - {t['mode_b']}: "
                f"{t['mean_diff']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] p={t['p_value']:.4g}"
            )
    for note in results.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def plot(results: dict[str, Any], path: str | Path, metrics: Sequence[str] = CHART_METRICS) -> Path:
    """One panel per pool (grouped bars: metric groups, one bar per mode), then median latency."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics for the chart: {', '.join(unknown)}")
    pools = [p for p in results["settings"]["pools"] if any(p in v for v in results["results"].values())]
    if not pools:
        raise ValueError("no results to plot")
    modes = list(results["results"])
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(pools) + 1, figsize=(5.2 * len(pools) + 3.6, 4.8), squeeze=False)
    width = 0.84 / max(1, len(modes))
    label_bars = len(modes) <= 4  # value labels stay legible only on a few bars per group
    for ax, pool in zip(axes[0], pools, strict=False):
        for i, mode in enumerate(modes):
            cell = results["results"][mode].get(pool, {})
            values = [cell.get(m, float("nan")) for m in metrics]
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=mode, color=colors[i % len(colors)])
            if label_bars:
                ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylim(0, 1.0)
        ax.set_title(f"{pool} pool ({results['pools'][pool]['documents']:,} docs)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    # latency: median per query, one group per pool
    lat_ax = axes[0][-1]
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(pools))]
        values = [results["results"][mode].get(p, {}).get("latency_ms", {}).get("median", 0.0) for p in pools]
        lat_ax.bar(xs, values, width, color=colors[i % len(colors)])
    lat_ax.set_xticks(range(len(pools)), pools)
    lat_ax.set_yscale("log")
    lat_ax.set_title("median latency per query (ms, log)", fontsize=10)
    lat_ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(modes), 6), fontsize=8, frameon=False)
    q = results.get("queries", {})
    fig.suptitle(
        f"{results['dataset']['name']} ({results['dataset']['split']}): {q.get('evaluated')} queries, "
        f"relevant = score >= {results['settings']['relevant_min']}, gain {results['settings']['gain']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
