"""Errors the engine raises to its callers."""
from orca_serve.scheduler.errors import QueueFullError, SLORejectedError


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unrecoverable failure."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


__all__ = ["QueueFullError", "SLORejectedError", "EngineDeadError", "EngineStoppedError"]
