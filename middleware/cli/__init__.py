"""`shopsearch …`: a thin shell over the library. Each subcommand lives in its own module here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from middleware import __version__

# each module exposes register(subparsers); its handler (set as `func`) returns an exit code
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "search",
    "eval",
    "index",
    "opensearch",
    "serve",
    "tune",
    "models",
    "rules",
    "synonyms",
    "ab",
    "events",
)

EXIT_OK = 0
EXIT_USAGE = 2  # bad usage or bad input (argparse uses 2 as well)
EXIT_FATAL = 1  # backend unreachable, model missing, …


class CliError(Exception):
    """An expected failure: printed as one line on stderr, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shopsearch",
        description="Semantic product search: hybrid retrieval, reranking and business scoring.",
    )
    parser.add_argument("--version", action="version", version=f"shopsearch {__version__}")
    parser.add_argument("--config", help="TOML or YAML settings file (env SHOPSEARCH_CONFIG)")
    parser.add_argument("--data-dir", help="embedded store directory (env SHOPSEARCH_DATA_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"middleware.cli.{name}").register(subparsers)
    return parser


def load_settings(args: argparse.Namespace, **overrides: object):  # -> Settings
    """Settings from --config / env, with CLI flags (non-None overrides) on top."""
    from pydantic import ValidationError

    from middleware.config import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "data_dir", None):
        values["data_dir"] = args.data_dir
    try:
        if getattr(args, "config", None):
            return Settings.from_file(args.config, **values)
        return Settings(**values)
    except ValidationError as err:
        from middleware.products import describe_validation_error

        raise CliError(f"invalid settings: {describe_validation_error(err)}", EXIT_USAGE) from None
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err), EXIT_USAGE) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # opensearch-py logs a traceback per failed request; the user gets one BackendError line instead
        logging.getLogger("opensearch").setLevel(logging.CRITICAL)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except CliError as err:
        print(f"shopsearch: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("shopsearch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `shopsearch stats | head`: the reader has what it wanted; stop quietly, as other tools do
        _silence_stdout()
        return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe cannot fail."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
