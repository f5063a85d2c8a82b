"""`shopsearch ab create|list|stop|report`: A/B experiments in <data_dir>/experiments.json and their reports.

`report` reads the experiment's query records and events from JSONL files (`--queries`, `--events`; the
record shapes of middleware/events/model.py), or, without them, from the event log of the data directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ab", help="A/B experiments: settings variants by a sticky hash of user or session")
    sub = p.add_subparsers(dest="ab_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="store experiments from a JSON file (an object or a list; same id replaces)")
    create.add_argument("file", help="JSON file, or - for stdin")
    create.set_defaults(func=run_create)
    ls = sub.add_parser("list", help="print every stored experiment as JSONL")
    ls.set_defaults(func=run_list)
    stop = sub.add_parser("stop", help="stop an experiment now (kept for its report)")
    stop.add_argument("id")
    stop.set_defaults(func=run_stop)
    rep = sub.add_parser("report", help="CTR and conversion per variant, tests against the control, checks")
    rep.add_argument("id")
    rep.add_argument("--queries", metavar="FILE", help="query records, JSONL (default: the data directory's event log)")
    rep.add_argument("--events", metavar="FILE", help="events, JSONL (with --queries)")
    rep.add_argument(
        "--data-dir", default=argparse.SUPPRESS, help="read the event log (and experiments) of this data directory"
    )
    rep.add_argument("--mde", type=float, default=0.05, help="relative effect to detect, for the power check")
    rep.add_argument("--alpha", type=float, default=0.05, help="significance level (intervals at 1 - alpha)")
    rep.add_argument("--power", type=float, default=0.8, help="power wanted for the mde")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.set_defaults(func=run_report)


def _store(args: argparse.Namespace):  # -> ExperimentStore
    from middleware.experiments import ExperimentStore, experiments_path

    return ExperimentStore(experiments_path(load_settings(args).data_dir))


def run_create(args: argparse.Namespace) -> int:
    from middleware.experiments import Experiment, ExperimentStore, experiment_error, experiments_path

    settings = load_settings(args)
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except OSError as err:
        raise CliError(f"cannot read {args.file}: {err.strerror}", EXIT_USAGE) from None
    except UnicodeDecodeError as err:
        raise CliError(f"{args.file} is not UTF-8: {err.reason}", EXIT_USAGE) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"{args.file}: invalid JSON: {err.msg} (line {err.lineno})", EXIT_USAGE) from None
    items = data if isinstance(data, list) else [data]
    found: list[Experiment] = []
    for i, item in enumerate(items):
        where = f"{args.file}" + (f" [{i}]" if isinstance(data, list) else "")
        if not isinstance(item, dict):
            raise CliError(f"{where}: an experiment is a JSON object", EXIT_USAGE)
        try:
            exp = Experiment.model_validate(item)
            exp.check_settings(settings)
        except ValidationError as err:
            name, message = experiment_error(err)
            raise CliError(f"{where}: {name}: {message}", EXIT_USAGE) from None
        except ValueError as err:
            raise CliError(f"{where}: {err}", EXIT_USAGE) from None
        found.append(exp)
    store = ExperimentStore(experiments_path(settings.data_dir))
    for exp in found:
        try:
            store.put(exp)
        except ValueError as err:
            raise CliError(f"{exp.id}: {err}", EXIT_USAGE) from None
        print(f"stored experiment {exp.id}: {', '.join(f'{v.name} {v.traffic:g}%' for v in exp.variants)}")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    for exp in _store(args).all():
        print(json.dumps(exp.model_dump(mode="json", exclude_none=True), ensure_ascii=False))
    return EXIT_OK


def run_stop(args: argparse.Namespace) -> int:
    stopped = _store(args).stop(args.id)
    if stopped is None:
        raise CliError(f"no experiment with id {args.id!r}", EXIT_USAGE)
    print(f"stopped experiment {args.id}")
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    from middleware.evaluation.ab import format_report, report
    from middleware.events.model import Event, QueryRecord

    settings = load_settings(args)
    exp = _store(args).get(args.id)
    if exp is None:
        raise CliError(f"no experiment with id {args.id!r} in {settings.data_dir}", EXIT_USAGE)
    if (args.queries is None) != (args.events is None):
        raise CliError("give both --queries and --events, or neither (to read the event log)", EXIT_USAGE)
    try:
        if args.queries is not None:
            queries = _jsonl(args.queries, QueryRecord)
            events = _jsonl(args.events, Event)
            rep = report(exp, queries, events, mde=args.mde, alpha=args.alpha, power=args.power)
        else:
            log = _open_event_log(settings)
            try:
                since = exp.active_from
                rep = report(
                    exp,
                    log.queries(since=since, until=exp.active_until),
                    log.events(since=since),
                    mde=args.mde,
                    alpha=args.alpha,
                    power=args.power,
                )
            finally:
                log.close()
    except ValueError as err:  # mde / alpha / power out of range
        raise CliError(str(err), EXIT_USAGE) from None
    if args.json:
        print(json.dumps(rep.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(format_report(rep))
    return EXIT_OK


def _open_event_log(settings: Any) -> Any:
    try:
        from middleware.events.store import open_event_log
    except ModuleNotFoundError as err:
        if err.name not in {"middleware.events.store"}:
            raise
        raise CliError(
            "this installation has no event log (middleware.events.store); give --queries and --events JSONL files"
        ) from None
    return open_event_log(settings)


def _jsonl(path: str, model: type[BaseModel]) -> Iterator[Any]:
    """Records of `model` from a JSONL file; a bad line stops the report, naming the line and the field."""
    try:
        stream = open(path, encoding="utf-8")  # noqa: SIM115 (closed by the generator)
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}", EXIT_USAGE) from None
    return _records(stream, path, model)


def _records(stream: Any, path: str, model: type[BaseModel]) -> Iterator[Any]:
    from middleware.products import describe_validation_error

    with stream:
        try:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    yield model.model_validate_json(line)
                except ValidationError as err:
                    raise CliError(f"{path}:{number}: {describe_validation_error(err)}", EXIT_USAGE) from None
        except UnicodeDecodeError as err:
            raise CliError(f"{path} is not UTF-8: {err.reason}", EXIT_USAGE) from None
