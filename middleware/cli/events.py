"""`shopsearch analytics` and `shopsearch events export|import`: the event log from the command line.

`analytics` prints the search reports (text, or `--json`), optionally a PNG of CTR by position.
`events export OUT_DIR` writes queries.jsonl and events.jsonl (oldest first, in the record shapes of
middleware.events.model). `events import FILE` stores the lines of such files: a line with an
`action` is an event, any other a query record; invalid lines go to a dead-letter file with their
line number and reason, valid ones are stored. Imported events are stored as given (the export of a
log holds only the events it trusted).

Exit codes: 0 done; 3 (import) some lines were rejected and every valid line was stored; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings

EXIT_REJECTED = 3
IMPORT_BATCH = 1000


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: without the flag the global `shopsearch --data-dir` (or the environment) stands
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help="embedded store directory")


def _time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def register(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser("analytics", help="search analytics over the event log (CTR, conversion, …)")
    _data_dir_option(a)
    a.add_argument("--since", type=_time, help="ISO 8601: searches at or after it (no zone: UTC)")
    a.add_argument("--until", type=_time, help="ISO 8601: searches before it")
    a.add_argument("--json", action="store_true", help="print the reports as JSON")
    a.add_argument("--png", metavar="FILE", help="write a chart of CTR by position (needs matplotlib)")
    a.add_argument("--limit", type=int, default=20, help="rows per report (default 20)")
    a.add_argument("--max-position", type=int, default=20, help="positions in CTR by position (default 20)")
    a.add_argument("--deep", type=float, default=5.0, help="deep clicks: mean click position at least (default 5)")
    a.add_argument("--min-clicks", type=int, default=2, help="deep clicks: clicks a query needs (default 2)")
    a.set_defaults(func=run_analytics)

    e = subparsers.add_parser("events", help="export or import the event log as JSONL")
    sub = e.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="write OUT_DIR/queries.jsonl and OUT_DIR/events.jsonl")
    _data_dir_option(exp)
    exp.add_argument("out_dir")
    exp.add_argument("--since", type=_time)
    exp.add_argument("--until", type=_time)
    exp.set_defaults(func=run_export)
    imp = sub.add_parser("import", help="store query records and events from a JSONL file")
    _data_dir_option(imp)
    imp.add_argument("file", help="JSONL file, or - for stdin")
    imp.add_argument(
        "--dead-letter", metavar="PATH", help="rejected lines (default <data_dir>/dead-letters/events-<time>.jsonl)"
    )
    imp.set_defaults(func=run_import)


def _open(args: argparse.Namespace, *, create: bool = False) -> Any:
    from middleware.backends.base import BackendError
    from middleware.events.sqlite import FILE_NAME
    from middleware.events.store import open_event_log

    settings = load_settings(args)
    path = Path(settings.data_dir) / FILE_NAME
    if settings.backend == "embedded" and not create and not path.is_file():
        raise CliError(f"no event log at {path} (is --data-dir the service's data directory?)", EXIT_USAGE)
    try:
        return settings, open_event_log(settings)
    except BackendError as err:
        raise CliError(str(err)) from None


def _check_window(args: argparse.Namespace) -> None:
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise CliError("--until must be later than --since", EXIT_USAGE)


def run_analytics(args: argparse.Namespace) -> int:
    from middleware import analytics
    from middleware.backends.base import BackendError

    _check_window(args)
    for name in ("limit", "max_position", "min_clicks"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.deep <= 0:
        raise CliError("--deep must be positive", EXIT_USAGE)
    _, store = _open(args)
    try:
        queries = list(store.queries(args.since, args.until))
        events = list(store.events(args.since, None))  # the window's searches' events, whenever they came
        untrusted = list(store.untrusted(args.since, args.until))
    except BackendError as err:
        raise CliError(str(err)) from None
    finally:
        store.close()
    result = analytics.report(
        queries,
        events,
        untrusted,
        limit=args.limit,
        max_position=args.max_position,
        min_position=args.deep,
        min_clicks=args.min_clicks,
    )
    if args.png:
        _png(result["ctr_by_position"], Path(args.png))
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(_text(result, args))
    return EXIT_OK


def _text(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"searches {r['searches']}, events {r['events']} {r['events_by_action']}"]
    u = r["untrusted_events"]
    reasons = ", ".join(f"{k} {v}" for k, v in u.items() if k != "total")
    lines.append(f"untrusted events {u['total']}" + (f" ({reasons})" if reasons else ""))
    c = r["conversion"]
    lines.append(
        f"conversion: click {c['click_rate']:.3f}, add_to_cart {c['add_to_cart_rate']:.3f}, "
        f"purchase {c['purchase_rate']:.3f} ({c['purchases']} purchases, value {c['value_sum']:.2f})"
    )
    lines.append("top queries (searches, zero results):")
    lines += [f"  {row['searches']:6d} {row['zero_results']:6d}  {row['query']}" for row in r["top_queries"]]
    lines.append("zero-result queries:")
    lines += [f"  {row['searches']:6d}  {row['query']}" for row in r["zero_results"]]
    lines.append("CTR by position (impressions, clicks, ctr):")
    lines += [
        f"  {row['position']:3d} {row['impressions']:7d} {row['clicks']:6d} {row['ctr']:.3f}"
        for row in r["ctr_by_position"]
        if row["impressions"]
    ]
    lines.append("CTR by query (searches, with click, ctr, mean click position):")
    for row in r["ctr_by_query"]:
        mean = f"{row['mean_click_position']:.1f}" if row["mean_click_position"] is not None else "-"
        lines.append(
            f"  {row['searches']:6d} {row['searches_with_click']:6d} {row['ctr']:.3f} {mean:>6}  {row['query']}"
        )
    lines.append(f"deep clicks (mean click position >= {args.deep:g}, at least {args.min_clicks} clicks):")
    lines += [f"  {row['mean_click_position']:6.1f} {row['clicks']:6d}  {row['query']}" for row in r["deep_clicks"]]
    return "\n".join(lines)


def _png(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--png needs matplotlib: pip install 'shopsearch[eval]'", EXIT_USAGE) from None
    positions = [row["position"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(positions, [row["ctr"] for row in rows], color="#3b75af")
    for bar, row in zip(bars, rows, strict=True):
        if row["impressions"]:
            ax.annotate(
                f"{row['clicks']}/{row['impressions']}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xlabel("position")
    ax.set_ylabel("click-through rate")
    ax.set_title("CTR by position (clicks / impressions)")
    ax.set_xticks(positions)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise CliError(f"cannot write {path}: {err.strerror}", EXIT_USAGE) from None
    finally:
        plt.close(fig)


def run_export(args: argparse.Namespace) -> int:
    from middleware.backends.base import BackendError

    _check_window(args)
    out = Path(args.out_dir)
    _, store = _open(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        store.close()
        raise CliError(f"cannot create {out}: {err.strerror}", EXIT_USAGE) from None
    counts = {}
    try:
        for name, rows in (
            ("queries", store.queries(args.since, args.until)),
            ("events", store.events(args.since, args.until)),
        ):
            tmp = out / f".{name}.jsonl.tmp"
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(row.model_dump_json(by_alias=True) + "\n")
                    n += 1
            os.replace(tmp, out / f"{name}.jsonl")
            counts[name] = n
    except BackendError as err:
        raise CliError(str(err)) from None
    finally:
        store.close()
    print(
        f"wrote {counts['queries']} query records to {out / 'queries.jsonl'}, "
        f"{counts['events']} events to {out / 'events.jsonl'}"
    )
    return EXIT_OK


def _line_error(err: ValidationError) -> str:
    first = err.errors()[0]
    name = ".".join(str(p) for p in first.get("loc", ())) or "line"
    message = "unknown field" if first.get("type") == "extra_forbidden" else str(first.get("msg", "invalid"))
    return f"{name}: {message.removeprefix('Value error, ')}"


def run_import(args: argparse.Namespace) -> int:
    from loaders.validate import DeadLetters, Rejection, json_object_lines
    from middleware.backends.base import BackendError
    from middleware.events.ingest import event_fault
    from middleware.events.model import Event, QueryRecord

    try:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    except OSError as err:
        raise CliError(f"cannot read {args.file}: {err.strerror}", EXIT_USAGE) from None
    settings, store = _open(args, create=True)
    rejected: list[Rejection] = []
    stored = {"queries": 0, "events": 0}
    pending: dict[str, list[tuple[int, Any, Any]]] = {"queries": [], "events": []}

    def flush(kind: str) -> None:
        batch = pending[kind]
        pending[kind] = []
        if not batch:
            return
        write = store.log_queries if kind == "queries" else store.append_events
        try:
            write([row for _, _, row in batch])
            stored[kind] += len(batch)
            return
        except BackendError:
            raise
        except Exception:
            pass
        for number, raw, row in batch:
            try:
                write([row])
                stored[kind] += 1
            except BackendError:
                raise
            except Exception as err:
                rejected.append(Rejection(number, raw, f"not stored: {str(err).splitlines()[0][:200]}"))

    try:
        with stream:
            try:
                for number, data in json_object_lines(stream, "a line"):
                    if isinstance(data, Rejection):
                        rejected.append(data)
                        continue
                    kind = "events" if "action" in data else "queries"
                    try:
                        row = Event.model_validate(data) if kind == "events" else QueryRecord.model_validate(data)
                    except ValidationError as err:
                        rejected.append(Rejection(number, data, _line_error(err)))
                        continue
                    fault = event_fault(row) if isinstance(row, Event) else None
                    if fault is not None:
                        rejected.append(Rejection(number, data, f"{fault[0]}: {fault[1]}"))
                        continue
                    pending[kind].append((number, data, row))
                    if len(pending[kind]) >= IMPORT_BATCH:
                        flush(kind)
            except UnicodeDecodeError as err:
                raise CliError(f"{args.file} is not UTF-8: {err.reason}", EXIT_USAGE) from None
            flush("queries")
            flush("events")
    except BackendError as err:
        raise CliError(str(err)) from None
    finally:
        store.close()
    print(f"stored {stored['queries']} query records and {stored['events']} events, rejected {len(rejected)}")
    if not rejected:
        return EXIT_OK
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = Path(args.dead_letter or Path(settings.data_dir) / "dead-letters" / f"events-{stamp}-{os.getpid()}.jsonl")
    dead = DeadLetters(path)
    dead.write(sorted(rejected, key=lambda r: r.line))
    dead.close()
    first = min(rejected, key=lambda r: r.line)
    print(f"rejected lines in {path} (first: line {first.line}: {first.reason})", file=sys.stderr)
    return EXIT_REJECTED
