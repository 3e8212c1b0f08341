"""Errors the scheduler raises to callers."""


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests; the caller should retry later."""


class SLORejectedError(RuntimeError):
    """The slo policy (reject admission) predicts the request's TTFT target cannot be met."""
