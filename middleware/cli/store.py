"""What every command that opens a store or loads the embedder shares: one way to do each.

A store records the embedder its vectors came from (`Backend.embedder_binding`). Commands that read a
store use that embedder unless the user chose one (`--embedder`, SHOPSEARCH_EMBEDDER or the config
file), so an offline user sets the model once, when indexing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from middleware.cli import EXIT_USAGE, CliError
from middleware.config import Settings


def load_embedder(settings: Settings) -> Any:  # -> Embedder | None
    """The configured embedder (None for "none"); a model that cannot load is one CliError line."""
    if not settings.embedder_enabled:
        return None
    try:
        from middleware.models import ModelLoadError
        from middleware.models import load_embedder as _load
    except ImportError as err:
        raise CliError(f"embedder support is not available ({err}); set SHOPSEARCH_EMBEDDER=none") from None
    try:
        return _load(settings)
    except ModelLoadError as err:
        raise CliError(str(err)) from None


def require_store(settings: Settings) -> None:
    """A command reading a missing embedded store: say so, and do not create the directory."""
    data_dir = Path(settings.data_dir)
    if settings.backend == "embedded" and not data_dir.is_dir():
        raise CliError(f"no store at {data_dir}: run `shopsearch index FILE` first (or pass --data-dir)")


def open_store(settings: Settings, dim: int | None = None) -> Any:  # -> Backend
    """The configured backend; unreachable or unusable is one CliError line."""
    from middleware.backends import BackendError, open_backend

    try:
        return open_backend(settings, dim=dim)
    except BackendError as err:
        raise CliError(f"backend unavailable: {err}") from None
    except ValueError as err:  # e.g. a dimension mismatch with the stored vectors
        raise CliError(str(err)) from None


def embedder_chosen(settings: Settings) -> bool:
    """Whether the user named an embedder (flag, environment or config file) rather than the default."""
    return "embedder" in settings.model_fields_set


def bound_settings(settings: Settings, backend: Any) -> Settings:
    """`settings` with the store's recorded embedder, unless the user chose one or the store has none."""
    from middleware.backends.base import BackendError

    try:
        binding = backend.embedder_binding()
    except BackendError as err:
        raise CliError(f"backend unavailable: {err}") from None
    if binding is None or embedder_chosen(settings) or binding.model == settings.embedder:
        return settings
    return settings.model_copy(update={"embedder": binding.model})


def check_embedder_fits(backend: Any, embedder: Any, settings: Settings) -> None:
    """A chosen embedder whose vectors cannot be compared with the store's: one line, before searching."""
    if embedder is None:
        return
    binding = backend.embedder_binding()
    if binding is not None:
        held, dim = binding.describe(), binding.dim
    else:  # a store indexed before bindings were recorded: its vectors' dimension still tells
        stats = backend.stats()
        held, dim = f"{stats.dim}-d vectors", stats.dim if stats.vectors else None
    where = settings.data_dir if settings.backend == "embedded" else "the index"
    if dim is not None and int(embedder.dim) != dim:
        raise CliError(
            f"{where} holds {held}, but --embedder {embedder.model_id!r} makes {embedder.dim}-d vectors: "
            "drop --embedder to use the store's, or index into a new store",
            EXIT_USAGE,
        )
    if binding is not None and binding.model != embedder.model_id:
        print(
            f"shopsearch: warning: {where} holds vectors of {binding.model!r}; searching them with "
            f"{embedder.model_id!r} as asked",
            file=sys.stderr,
        )


def open_pipeline(settings: Settings) -> tuple[Any, Settings]:  # -> (Pipeline, Settings)
    """A search pipeline over the configured store with the store's embedder (see `bound_settings`)."""
    from middleware.backends.base import BackendError
    from middleware.models import ModelLoadError, load_reranker
    from middleware.pipeline import Pipeline

    require_store(settings)
    backend = open_store(settings)
    try:
        try:
            settings = bound_settings(settings, backend)
            embedder = load_embedder(settings)
            check_embedder_fits(backend, embedder, settings)
            reranker = load_reranker(settings)
        except ModelLoadError as err:
            raise CliError(str(err)) from None
        except BackendError as err:
            raise CliError(f"backend unavailable: {err}") from None
    except BaseException:
        backend.close()
        raise
    gpu = bool(reranker is not None and getattr(reranker, "device", "cpu") == "cuda")
    return Pipeline(settings, backend, embedder, reranker, gpu=gpu), settings
