"""`shopsearch synonyms import FILE` / `shopsearch synonyms show`: the query-time synonym set."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings

EXIT_REJECTED = 3  # some lines were rejected (see the dead-letter file); every good line was imported

EPILOG = """\
FILE holds Solr-format synonym rules, one a line: "a, b, c" (equivalent terms) or "a, b => c"
(a query's a or b is replaced by c); "#" starts a comment. The imported set replaces the current one
(--merge: adds to it) and applies to the next query of every worker: no reindex. Bad lines go to the
dead-letter file as {"line", "raw", "reason"}.

exit codes:
  0  every line was imported
  3  some lines were rejected (see the dead-letter file); every good line was imported
  2  usage error: missing or unreadable file
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synonyms",
        help="import or show the query-time synonym set (applies without a reindex)",
        description="The synonym set of lexical (BM25) queries: <data_dir>/synonyms.json unless synonyms_file.",
    )
    sub = p.add_subparsers(dest="synonyms_command", metavar="ACTION")
    imp = sub.add_parser(
        "import",
        help="replace the synonym set with a Solr-format file",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("file", metavar="FILE", help='Solr synonyms file (UTF-8); "-" reads stdin')
    imp.add_argument("--merge", action="store_true", help="add to the current set instead of replacing it")
    imp.add_argument("--dead-letter", metavar="PATH", help="rejected lines (default <data_dir>/dead-letters/…)")
    imp.set_defaults(func=run_import)
    show = sub.add_parser("show", help="print the current synonym set, one Solr line each")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def _read(file: str) -> list[str]:
    if file == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(file).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CliError(f"no such file: {file}", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {file}: {err}", EXIT_USAGE) from None


def run_import(args: argparse.Namespace) -> int:
    from middleware.query_expansion import SynonymStore, parse_synonyms, synonyms_path

    settings = load_settings(args)
    lines = _read(args.file)
    rules, errors = parse_synonyms(lines)
    store = SynonymStore(synonyms_path(settings))
    if args.merge:
        current = store.current().rules
        rules = current + [r for r in rules if r not in current]
    count = store.replace(rules)
    print(f"imported {count} synonym rules into {store.path}")
    if not errors:
        return EXIT_OK
    path = (
        Path(args.dead_letter)
        if args.dead_letter
        else Path(settings.data_dir) / "dead-letters" / f"synonyms-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for err in errors:
            raw = lines[err.line - 1] if err.line <= len(lines) else ""
            f.write(json.dumps({"line": err.line, "raw": raw, "reason": err.message}, ensure_ascii=False) + "\n")
    first = errors[0]
    print(f"{len(errors)} lines rejected (first: line {first.line}: {first.message}); see {path}", file=sys.stderr)
    return EXIT_REJECTED


def run_show(args: argparse.Namespace) -> int:
    from middleware.query_expansion import SynonymStore, synonyms_path

    for line in SynonymStore(synonyms_path(load_settings(args))).lines():
        print(line)
    return EXIT_OK
