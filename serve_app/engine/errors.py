"""The engine's exceptions (the tree is drawn in `serve_app.engine`'s docstring)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's exceptions."""


class ModelFileMissing(EngineError):
    """The configured weights file does not exist; the message names the path."""


class EngineUnavailable(EngineError):
    """The requested backend cannot run here (no GPU, package missing, export failed)."""


class UnknownBackend(EngineError):
    """The configured backend is not in the registry; the message lists the ones that are."""
