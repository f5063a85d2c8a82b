"""`shopsearch rules import|list|delete`: merchandising rules in <data_dir>/rules.json.

Exit codes of import: 0 every rule stored; 3 some lines were rejected (see the dead-letter file) and every
valid rule was stored; 2 bad usage (an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings

EXIT_REJECTED = 3  # some lines were rejected; every valid rule was stored


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rules", help="merchandising rules: pin, hide, boost, bury")
    sub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="store rules from a JSONL file (one rule a line; same id replaces)")
    imp.add_argument("file", help="JSONL file of rules, or - for stdin")
    imp.add_argument(
        "--dead-letter", metavar="PATH", help="rejected lines (default <data_dir>/dead-letters/rules-<time>.jsonl)"
    )
    imp.set_defaults(func=run_import)
    ls = sub.add_parser("list", help="print every stored rule as JSONL")
    ls.set_defaults(func=run_list)
    rm = sub.add_parser("delete", help="delete a rule by id")
    rm.add_argument("id")
    rm.set_defaults(func=run_delete)


def _store(args: argparse.Namespace):  # -> RuleStore
    from middleware.rules import RuleStore, rules_path

    return RuleStore(rules_path(load_settings(args).data_dir))


def run_import(args: argparse.Namespace) -> int:
    from loaders.validate import DeadLetters, Rejection, json_object_lines
    from middleware.rules import Rule, RuleStore, rule_error, rules_path

    settings = load_settings(args)

    try:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    except OSError as err:
        raise CliError(f"cannot read {args.file}: {err.strerror}", EXIT_USAGE) from None
    rules: list[Rule] = []
    rejected: list[Rejection] = []
    seen: dict[str, int] = {}
    with stream:
        try:
            for number, data in json_object_lines(stream, "a rule"):
                if isinstance(data, Rejection):
                    rejected.append(data)
                    continue
                try:
                    rule = Rule.model_validate(data)
                except ValidationError as err:
                    name, message = rule_error(err)
                    rejected.append(Rejection(number, data, f"{name}: {message}"))
                    continue
                if rule.id in seen:
                    rejected.append(Rejection(number, data, f"id: {rule.id!r} is also on line {seen[rule.id]}"))
                    continue
                seen[rule.id] = number
                rules.append(rule)
        except UnicodeDecodeError as err:
            raise CliError(f"{args.file} is not UTF-8: {err.reason}", EXIT_USAGE) from None
    try:
        RuleStore(rules_path(settings.data_dir)).put(rules)
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    print(f"stored {len(rules)} rules, rejected {len(rejected)}")
    if not rejected:
        return EXIT_OK
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = Path(args.dead_letter or Path(settings.data_dir) / "dead-letters" / f"rules-{stamp}-{os.getpid()}.jsonl")
    dead = DeadLetters(path)
    dead.write(rejected)
    dead.close()
    first = rejected[0]
    print(f"rejected lines in {path} (first: line {first.line}: {first.reason})", file=sys.stderr)
    return EXIT_REJECTED


def run_list(args: argparse.Namespace) -> int:
    for rule in _store(args).all():
        print(json.dumps(rule.model_dump(mode="json"), ensure_ascii=False))
    return EXIT_OK


def run_delete(args: argparse.Namespace) -> int:
    if not _store(args).delete(args.id):
        raise CliError(f"no rule with id {args.id!r}", EXIT_USAGE)
    print(f"deleted rule {args.id}")
    return EXIT_OK
