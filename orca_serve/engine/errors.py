"""Errors the engine raises to its callers."""
from orca_serve.scheduler.errors import QueueFullError


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unrecoverable failure."""


__all__ = ["QueueFullError", "EngineDeadError"]
