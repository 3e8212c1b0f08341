"""Executors run a SchedulerOutput on the worker(s) and return sampled tokens.

``UniprocExecutor`` runs the model runner in this process;
``distributed.executor.DistributedExecutor`` drives T x P worker processes.
The engine only sees ``submit``/``collect``, ``check_health`` and
``shutdown``, so either slots in without the engine knowing which.
"""
from __future__ import annotations

import logging

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput
from orca_serve.config import EngineConfig

logger = logging.getLogger(__name__)


class Executor:
    """``submit`` starts a batch and ``collect`` waits for its result, so an
    executor with P pipeline stages can hold P batches in flight; batches are
    collected in submission order."""

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def submit(self, so: SchedulerOutput):
        """Start a batch; returns a handle for ``collect``. The default runs it now."""
        try:
            return ("ok", self.execute_model(so))
        except Exception as exc:  # surfaced by collect, where the engine handles failures
            return ("error", exc)

    def collect(self, handle) -> ModelRunnerOutput:
        status, value = handle
        if status == "error":
            raise value
        return value

    def shutdown(self) -> None:
        pass

    def check_health(self) -> None:
        """Raise if a worker is gone (the executor can run no more batches)."""


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        from orca_serve.models.loader import resolve_device
        from orca_serve.worker.model_runner import ModelRunner

        self.runner = ModelRunner(config, device=resolve_device(config.model))
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.num_cpu_blocks = self.runner.num_cpu_blocks
        if config.scheduler.async_scheduling and self.runner.device.type == "cpu":
            logger.warning("async_scheduling on a CPU overlaps nothing (the model runs in the engine's thread) "
                           "and returns each token one iteration later; it is meant for a GPU")

    def submit(self, so: SchedulerOutput):
        # Launched, not waited for: the engine schedules the next batch (async
        # scheduling) or collects at once.
        try:
            return ("ok", self.runner.execute_model_async(so))
        except Exception as exc:  # surfaced by collect, where the engine handles failures
            self.runner.batch_failed(so)
            return ("error", exc)

    def collect(self, handle) -> ModelRunnerOutput:
        return super().collect(handle).result()


def make_executor(config: EngineConfig) -> Executor:
    """The executor for ``config``'s T x P ranks; its ``num_kv_blocks`` and
    ``num_cpu_blocks`` are the pool sizes the rank(s) chose (``worker/kv_sizing.py``)."""
    if config.parallel.world_size > 1:
        from orca_serve.distributed.executor import DistributedExecutor

        return DistributedExecutor(config)
    return UniprocExecutor(config)
