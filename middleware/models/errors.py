"""Errors raised by the model layer."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be found, loaded or exported; the message is one line a user can act on."""
