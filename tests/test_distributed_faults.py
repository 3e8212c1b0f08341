"""A worker that dies or hangs mid-generation: every request finishes with an
error, the engine reports itself unhealthy and refuses new work, and every
worker process is gone (reaped, no zombies) within a bounded time."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from orca_serve.config import EngineConfig
from orca_serve.engine.async_engine import AsyncLLMEngine
from orca_serve.engine.errors import EngineDeadError
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.sampling_params import SamplingParams
from test_engine_correctness import make_prompts


def config(path, **kw):
    return EngineConfig.from_kwargs(model=path, num_kv_blocks=200, block_size=4, max_num_batched_tokens=64, **kw)


def gone(pid: int) -> bool:
    """The process no longer exists (exited and reaped: not even a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def test_killed_worker_fails_requests_and_stops_the_others(tiny_model_dir):
    engine = LLMEngine(config(tiny_model_dir("llama"), tensor_parallel_size=2, worker_timeout_s=30))
    pids = dict(engine.executor.worker_pids)
    try:
        for i, prompt in enumerate(make_prompts(6, 384, seed=3)):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=100, ignore_eos=True))
        for _ in range(4):
            engine.step()
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)  # mid-generation: rank 0 is its all-reduce peer
        finished = {}
        while engine.has_unfinished_requests():
            assert time.monotonic() - t0 < 30, "the engine did not notice the dead worker"
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert sorted(finished) == [str(i) for i in range(6)]
        assert all(o.finish_reason == "error" and "worker rank" in o.error for o in finished.values())
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            engine.add_request("late", [5, 6, 7], SamplingParams(max_tokens=2))
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids.values()), "worker processes left behind"
    finally:
        engine.shutdown()


def test_hung_worker_times_out_and_async_clients_get_errors(tiny_model_dir):
    async_engine = AsyncLLMEngine.from_config(config(tiny_model_dir("gpt2"), pipeline_parallel_size=2,
                                                     worker_timeout_s=2))
    pids = dict(async_engine.engine.executor.worker_pids)
    stopped = []

    async def client(i, prompt):
        last = None
        try:
            async for out in async_engine.generate(str(i), prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
                last = out
                if not stopped:  # generation is under way: freeze the last stage
                    stopped.append(time.monotonic())
                    os.kill(pids[1], signal.SIGSTOP)
        except EngineDeadError as exc:
            return str(exc)
        return last

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(client(i, p) for i, p in enumerate(make_prompts(4, 384, seed=4)))), timeout=60)

    try:
        results = asyncio.run(main())
        for r in results:  # a finished output with the error, or the engine-dead error
            assert isinstance(r, str) or (r.finished and r.finish_reason == "error" and "hangs" in r.error)
        assert time.monotonic() - stopped[0] < 30
        deadline = time.monotonic() + 10
        while async_engine.is_healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not async_engine.is_healthy
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids.values()), "worker processes left behind"
    finally:
        async_engine.shutdown()
        for pid in pids.values():  # never leave a stopped process behind a failed assertion
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_setting_a_worker_refuses_is_one_line(tiny_model_dir):
    # A worker's ValueError at start-up (here: native kernels demanded for
    # bfloat16) reached the user as two tracebacks; it is a bad setting.
    from orca_serve.distributed.control import WorkerSettingError

    with pytest.raises(WorkerSettingError) as info:
        LLMEngine(config(tiny_model_dir("llama"), tensor_parallel_size=2, dtype="bfloat16", cpu_kernels="on"))
    assert isinstance(info.value, ValueError) and "Traceback" not in str(info.value)
    assert str(info.value).startswith("worker rank ")
    assert "cpu_kernels='on' but the native CPU kernels cannot be used" in str(info.value)


def test_a_worker_that_fails_to_start_leaves_no_leaked_semaphore(tiny_model_dir):
    # A rank that fails at start-up leaves with os._exit, which skips the
    # finalizer unlinking the named semaphore behind tqdm's lock; the driver's
    # resource tracker then warned of "leaked semaphore objects" as it exited.
    # The warning comes when the driver's process ends, so the driver runs in one.
    kwargs = dict(model=tiny_model_dir("llama"), num_kv_blocks=200, block_size=4, max_num_batched_tokens=64,
                  tensor_parallel_size=2, dtype="bfloat16", cpu_kernels="on")
    driver = ("from orca_serve.config import EngineConfig\n"
              "from orca_serve.engine.llm_engine import LLMEngine\n"
              f"LLMEngine(EngineConfig.from_kwargs(**{kwargs!r}))\n")
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "WorkerSettingError: worker rank " in done.stderr
    assert "cpu_kernels='on' but the native CPU kernels cannot be used" in done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr
