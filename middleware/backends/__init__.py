"""Storage backends behind one Protocol: `open_backend(settings)` picks one from the configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from middleware.backends.base import Backend, BackendError

if TYPE_CHECKING:
    from middleware.config import Settings

__all__ = ["Backend", "BackendError", "open_backend"]


def open_backend(settings: Settings, *, dim: int | None = None) -> Backend:
    """The configured backend. `dim` is the embedder's dimension (needed to create a vector index)."""
    if settings.backend == "embedded":
        from middleware.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings.data_dir, dim=dim)
    from middleware.backends.opensearch import OpenSearchBackend

    return OpenSearchBackend.from_settings(settings, dim=dim)
