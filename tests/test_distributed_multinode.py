"""Two nodes on one machine: the driver's launch (node 0: the engine and rank
0) and a separately started ``orca-serve worker`` launch (node 1: rank 1)
meet over loopback; greedy output equals one process, and node 1 exits
cleanly when the driver shuts down."""
import socket
import subprocess
import sys

from helpers_models import torch_threads
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from test_engine_correctness import make_prompts, run_staggered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launches_on_loopback_match_single_process(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = make_prompts(6, 384, seed=11, hi=40)
    max_tokens = [8] * len(prompts)
    common = dict(model=path, num_kv_blocks=100, block_size=4, max_num_batched_tokens=48)
    with torch_threads(1):
        single = LLMEngine(EngineConfig.from_kwargs(**common))
        expected = [o.token_ids for o in run_staggered(single, prompts, max_tokens)]

    port = free_port()
    node1 = subprocess.Popen([sys.executable, "-m", "orca_serve.entrypoints.cli", "worker", "--nnodes", "2",
                              "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                              "--tensor-parallel-size", "2", "--model", path])
    engine = None
    try:
        engine = LLMEngine(EngineConfig.from_kwargs(**common, tensor_parallel_size=2, nnodes=2, node_rank=0,
                                                    master_addr="127.0.0.1", master_port=port,
                                                    worker_timeout_s=60))
        assert len(engine.executor.procs) == 1, "node 0 runs one rank, node 1 the other"
        assert node1.pid not in engine.executor.worker_pids.values()
        got = [o.token_ids for o in run_staggered(engine, prompts, max_tokens)]
        assert got == expected
        engine.shutdown()
        assert node1.wait(timeout=30) == 0
    finally:
        if engine is not None:
            engine.shutdown()
        if node1.poll() is None:
            node1.kill()
            node1.wait()
