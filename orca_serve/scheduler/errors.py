"""Errors the scheduler raises to callers."""


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests; the caller should retry later."""
