"""Starting and stopping worker processes, on the driver's node or another.

Every rank is a process started with multiprocessing "spawn" (a fresh
interpreter: no forked CUDA or thread state). The driver on node 0 starts
ranks ``[0, W/nnodes)``; ``orca-serve worker --node-rank R`` starts node R's
ranks with ``run_node``, which reads the driver's start-up message from the
rendezvous store, so every node runs exactly the driver's configuration.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import pickle
import signal
import socket
import time
from datetime import timedelta
from multiprocessing.connection import wait as wait_any

import torch.distributed as dist

from orca_serve.config import EngineConfig

logger = logging.getLogger(__name__)

INIT_KEY = "orca/init"
# How long a node launched before the driver waits for it to come up.
RENDEZVOUS_TIMEOUT_S = 600.0


def listen_error(host: str | None, port: int) -> str | None:
    """Why a server cannot listen at (host, port) on this machine, or None if it
    can: a name that does not resolve, no address of this machine, a port in
    use. Like asyncio's ``create_server`` (uvicorn), every address the name
    resolves to is tried and those of a family or address this machine lacks
    are skipped, so "localhost" passes on a host without IPv6. ``host`` None:
    every interface (torch's TCPStore master listens there)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    bound, skipped = False, None
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves bind
                s.bind(address)
            bound = True
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                return str(exc)  # a port in use, or one this user may not take
            skipped = skipped or str(exc)
    return None if bound else skipped or f"{host!r} resolves to no address"


def driver_address_error(master_addr: str, port: int) -> str | None:
    """Why the driver cannot serve the rendezvous at (master_addr, port), or
    None. torch's TCPStore master listens on every interface and then connects
    to master_addr itself, so the port must be free here and master_addr must
    reach this machine (a service name or a NAT'd address that does is fine);
    one that does not left the store retrying until the start-up timeout."""
    why = listen_error(None, port)
    if why:
        return why
    dual = socket.has_dualstack_ipv6()
    with socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                              dualstack_ipv6=dual) as server:
        probe_port = server.getsockname()[1]
        try:
            with socket.create_connection((master_addr, probe_port), timeout=3.0):
                pass
        except OSError as exc:
            return f"this machine cannot reach itself at {master_addr}:{probe_port}: {exc}"
    return None


def node_ranks(config: EngineConfig, node_rank: int) -> list[int]:
    """Global ranks that run on ``node_rank`` (contiguous, so a node holds whole TP groups when it can)."""
    p = config.parallel
    per_node = p.world_size // p.nnodes
    return list(range(node_rank * per_node, (node_rank + 1) * per_node))


def spawn_ranks(ranks: list[int], init: dict) -> list[mp.Process]:
    """Start one worker process per rank; ``init`` is the driver's start-up message."""
    from orca_serve.worker.worker import run_worker  # the process entry point, one layer up

    ctx = mp.get_context("spawn")
    procs = []
    for local_rank, rank in enumerate(ranks):
        proc = ctx.Process(target=run_worker, args=(rank, local_rank, len(ranks), init),
                           name=f"orca-worker-{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def stop_processes(procs: list[mp.Process], grace_s: float) -> None:
    """Wait up to ``grace_s`` for processes to exit, then SIGTERM, then SIGKILL;
    always reap them so no zombie is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()  # also ends a stopped (SIGSTOP) process
            proc.join(5.0)


def run_node(master_addr: str, master_port: int, nnodes: int, node_rank: int,
             tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None) -> int:
    """``orca-serve worker``: run node ``node_rank``'s ranks until the driver stops them.

    The model, T and P come from the driver; sizes given here are only
    checked against it. Returns a process exit code: 0 when every rank exited cleanly.
    """
    if not 0 < node_rank < nnodes:
        raise ValueError(f"node_rank must be in [1, nnodes={nnodes}) for a worker node; node 0 runs the driver "
                         "(orca-serve serve/generate or LLM(...))")
    # Waiting for a driver that has not started yet is this node's job; waiting
    # the rendezvous timeout out for one that cannot be reached at all is not.
    if not 1 <= master_port <= 65535:
        raise ValueError(f"master_port must be an integer in [1, 65535], got {master_port}")
    try:
        socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"master_addr {master_addr!r} does not resolve: {exc}") from None
    logger.info("node %d: waiting for the driver at %s:%d", node_rank, master_addr, master_port)
    store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    init = pickle.loads(store.get(INIT_KEY))
    driver = init["config"].parallel
    mine = dict(nnodes=nnodes, tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    for name, value in mine.items():
        if value is not None and value != getattr(driver, name):
            raise ValueError(f"this node was started with {name}={value} but the driver runs {getattr(driver, name)}")
    ranks = node_ranks(init["config"], node_rank)
    logger.info("node %d: starting ranks %s (T=%d, P=%d)", node_rank, ranks,
                driver.tensor_parallel_size, driver.pipeline_parallel_size)
    procs = spawn_ranks(ranks, init)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    # A rank that fails takes its node down: the driver notices and fails the engine.
    while not stop and all(proc.is_alive() for proc in procs):
        wait_any([proc.sentinel for proc in procs], timeout=0.5)
    stop_processes(procs, grace_s=0.0 if stop else 10.0)
    return max((abs(proc.exitcode or 0) for proc in procs), default=0)
