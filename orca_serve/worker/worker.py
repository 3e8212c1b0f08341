"""One worker rank: a process that owns a model runner for its shard.

Started by ``distributed/launch.py`` (on the driver's node or through
``orca-serve worker``), a rank connects its control channel to the driver,
joins the workers' torch.distributed group, builds its part of the model,
reports "ready", then runs every batch the driver sends, in order. Only the
last stage's TP rank 0 sends results back. Any exception is fatal: the rank
sends its traceback and exits, since its peers cannot go on without it.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import traceback
from collections import deque
from datetime import timedelta

# How many recent batches a rank keeps timing records for (batch_trace).
_TRACE_LEN = 4096


def run_worker(rank: int, local_rank: int, local_world_size: int, init: dict) -> None:
    """Process entry point (multiprocessing "spawn" target)."""
    import torch
    import torch.distributed as dist

    from orca_serve.distributed.control import connect
    from orca_serve.distributed.parallel_state import destroy_worker_distributed, init_worker_distributed
    from orca_serve.models.loader import resolve_device

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    _progress_bars_lock_threads_only()
    config = init["config"]
    p = config.parallel
    try:
        conn = connect(init["control"], init["authkey"], rank, os.getpid())
    except (EOFError, ConnectionError):
        os._exit(1)  # the driver went away during start-up
    code = 0
    try:
        device = resolve_device(config.model, local_rank)  # an error here reaches the driver
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        else:
            # Share this node's cores among its ranks instead of oversubscribing them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // local_world_size))
        host, port = init["store"]
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=p.worker_timeout_s))
        init_worker_distributed(rank, p.tensor_parallel_size, p.pipeline_parallel_size,
                                dist.PrefixStore("orca/pg", store), "nccl" if cuda else "gloo", p.worker_timeout_s)
        from orca_serve.worker.model_runner import ModelRunner  # inside the try: a failure reaches the driver

        runner = ModelRunner(config, device=device)
        conn.send(("ready", rank, dict(pid=os.getpid(), param_bytes=runner.param_bytes,
                                       bytes_read=runner.load_stats.bytes_read,
                                       num_layers=len(runner.kv_pool.layers), kv_cache_bytes=runner.kv_pool.nbytes,
                                       num_kv_blocks=runner.num_kv_blocks, num_cpu_blocks=runner.num_cpu_blocks)))
        _serve(conn, runner, rank)
    except (EOFError, ConnectionError):
        code = 1  # the driver is gone: nothing to report to
    except BaseException as exc:
        code = 1
        try:
            # A ValueError is a bad setting (a pool too large, kernels demanded
            # where they cannot run): its message alone is what the user needs.
            conn.send(("error", rank, traceback.format_exc(), str(exc) if isinstance(exc, ValueError) else None))
        except OSError:
            pass
    finally:
        if code == 0:
            destroy_worker_distributed()
        conn.close()
    if code:
        # Skip interpreter teardown after a failure: it could block on gloo
        # connections to peers that are gone, and nothing is left to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _progress_bars_lock_threads_only() -> None:
    """Give tqdm a thread lock before any bar (the weight loader's) makes its default one.

    tqdm's default lock includes a multiprocessing RLock, which under "spawn"
    is a named semaphore registered with the driver's resource tracker. A rank
    shares it with no other process (each rank makes its own), and a rank
    that fails leaves by ``os._exit`` (or is killed), which skips the
    finalizer unlinking it: the tracker then warned of "leaked semaphore
    objects" when the driver exited."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _serve(conn, runner, rank: int) -> None:
    """Run batches until the driver says stop (None)."""
    trace: deque = deque(maxlen=_TRACE_LEN)
    while True:
        waiting_since = time.time()
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        if msg[0] == "trace":
            conn.send(("trace", rank, list(trace)))
            continue
        _, seq, so, sent_at = msg
        start = time.time()
        out = runner.execute_model(so)
        end = time.time()
        # (seq, control cost: from the driver's send, or from when this rank
        # asked if the message was already queued, to decoded; start; compute
        # start after the previous stage's hidden states arrived; end).
        # Wall clock, so comparable across the processes of one machine.
        trace.append((seq, start - max(sent_at, waiting_since), start, start + runner.last_recv_wait_s, end))
        if out is not None:
            conn.send(("out", seq, out))
