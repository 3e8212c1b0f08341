"""Executors run a SchedulerOutput on the worker(s) and return sampled tokens.

``UniprocExecutor`` runs the model runner in this process. The engine only
sees ``execute_model`` and ``shutdown``, so a distributed executor slots in
without the engine knowing.
"""
from __future__ import annotations

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput
from orca_serve.config import EngineConfig


class Executor:
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def check_health(self) -> None:
        """Raise if a worker is gone."""


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, num_kv_blocks: int, num_cpu_blocks: int = 0) -> None:
        from orca_serve.worker.model_runner import ModelRunner

        self.runner = ModelRunner(config, num_kv_blocks, num_cpu_blocks=num_cpu_blocks)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(so)


def make_executor(config: EngineConfig, num_kv_blocks: int, num_cpu_blocks: int = 0) -> Executor:
    if config.parallel.world_size > 1:
        from orca_serve.distributed.executor import DistributedExecutor

        return DistributedExecutor(config, num_kv_blocks, num_cpu_blocks=num_cpu_blocks)
    return UniprocExecutor(config, num_kv_blocks, num_cpu_blocks=num_cpu_blocks)
