"""Errors the engine raises to its callers."""
from orca_serve.scheduler.errors import QueueFullError, SLORejectedError


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unrecoverable failure."""


__all__ = ["QueueFullError", "SLORejectedError", "EngineDeadError"]
