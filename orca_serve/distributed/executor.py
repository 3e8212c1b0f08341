"""The driver's view of T x P worker ranks: submit batches, collect their tokens.

``submit`` sends the iteration's SchedulerOutput to every rank (each needs
it to build positions and cache slots) and returns at once; ``collect``
waits for that batch's sampled tokens from the last stage's TP rank 0.
Batches are collected in submission order, so with P stages the engine keeps
P batches in the pipeline: stage 0 computes batch i+1 while stage 1 computes
batch i.

Faults: ``collect`` waits on the result, on every rank's control connection
(a dead rank reads as end-of-file, a failing one sends its traceback) and on
the local processes' exits at once, with ``worker_timeout_s`` as the bound
for a hung rank. Any of these marks the executor dead, stops every worker
(SIGTERM, then SIGKILL, reaped) and raises ``WorkerFailedError``; from then
on ``check_health`` raises too.

Same interface as ``engine.executor.Executor`` (duck-typed, so this package
does not import the engine).
"""
from __future__ import annotations

import logging
import pickle
import secrets
import time
import weakref
from datetime import timedelta
from multiprocessing.connection import wait as wait_any

import torch.distributed as dist

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput
from orca_serve.config import EngineConfig
from orca_serve.distributed.control import ControlServer, WorkerFailedError, recv_or_fail
from orca_serve.distributed.launch import INIT_KEY, driver_address_error, node_ranks, spawn_ranks, stop_processes

logger = logging.getLogger(__name__)

# Loading a large checkpoint, or an operator starting the other nodes, can take
# minutes; a local rank that dies or a rank that reports an error is noticed at once.
STARTUP_TIMEOUT_S = 900.0


class DistributedExecutor:
    def __init__(self, config: EngineConfig) -> None:
        p = config.parallel
        self.world_size = p.world_size
        self.timeout_s = p.worker_timeout_s
        self._dead: str | None = None
        self._next_seq = 0
        self._results: dict[int, ModelRunnerOutput] = {}
        # The driver runs on node 0 and serves the rendezvous: a taken port, or a
        # master_addr that does not reach this machine, would leave the store
        # retrying to reach itself until the start-up timeout.
        why = driver_address_error(p.master_addr, p.master_port or 0)
        if why:
            raise ValueError(f"the driver cannot serve master_addr {p.master_addr!r}, master_port "
                             f"{p.master_port or 'any'} (node 0 runs it: a free port, and an address that "
                             f"reaches this machine): {why}")
        # The rendezvous store: workers on every node find the start-up message
        # here and use it to form their torch.distributed process group.
        self.store = dist.TCPStore(p.master_addr, p.master_port or 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
        authkey = secrets.token_bytes(32)
        self.control = ControlServer(p.master_addr, authkey)
        init = dict(config=config, store=(p.master_addr, self.store.port), control=self.control.address,
                    authkey=authkey)
        self.store.set(INIT_KEY, pickle.dumps(init))
        self.procs = spawn_ranks(node_ranks(config, 0), init)
        self._finalizer = weakref.finalize(self, _teardown, self.control, self.procs)
        self._sentinels = {proc.sentinel: f"worker rank {r} (pid {proc.pid})"
                           for r, proc in zip(node_ranks(config, 0), self.procs)}
        try:
            self.worker_info = self.control.wait_ready(self.world_size, STARTUP_TIMEOUT_S, self._sentinels)
        except BaseException:
            self._finalizer()
            raise
        self._rank_of = {conn: rank for rank, conn in self.control.conns.items()}
        # Every rank sized its pools alike (the smallest any rank's memory or budget allowed).
        sizes = {(info["num_kv_blocks"], info["num_cpu_blocks"]) for info in self.worker_info.values()}
        if len(sizes) != 1:
            self._finalizer()
            raise RuntimeError(f"worker ranks disagree on the KV pool sizes: {sorted(sizes)} "
                               f"(device blocks, host blocks)")
        self.num_kv_blocks, self.num_cpu_blocks = sizes.pop()
        logger.info("%d worker ranks ready (T=%d, P=%d): %s", self.world_size, p.tensor_parallel_size,
                    p.pipeline_parallel_size, {r: i["param_bytes"] for r, i in sorted(self.worker_info.items())})

    @property
    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of every worker, local or on another node."""
        return {rank: info["pid"] for rank, info in self.worker_info.items()}

    # ---- batches --------------------------------------------------------
    def submit(self, so: SchedulerOutput) -> int:
        """Send the batch to every rank; returns its handle (a sequence number)."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        if self._dead is None:
            t0 = time.perf_counter()
            try:
                nbytes = self.control.broadcast(("batch", seq, so, time.time()))
            except OSError as exc:  # a rank's connection is gone: reported by collect
                self._fail(f"cannot send iteration {so.iteration} to the workers: {exc}", raise_=False)
            else:
                seconds = time.perf_counter() - t0
                self.control.stats.record(nbytes, seconds)
                logger.debug("control message for iteration %d: %d bytes, %.0f us", so.iteration, nbytes,
                             1e6 * seconds)
        return seq

    def collect(self, seq: int) -> ModelRunnerOutput:
        """Wait for batch ``seq``'s sampled tokens (raises WorkerFailedError)."""
        deadline = time.monotonic() + self.timeout_s
        while seq not in self._results:
            if self._dead is not None:
                raise WorkerFailedError(self._dead)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"no result for a batch within worker_timeout_s={self.timeout_s:g}s: a worker hangs")
            self._poll(remaining)
        return self._results.pop(seq)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.submit(so))

    def _poll(self, timeout: float) -> None:
        """Read whatever the ranks sent (results, errors, end-of-file) and notice exits."""
        ready = wait_any(list(self._rank_of) + list(self._sentinels), timeout=timeout)
        # Connections first: a failing rank's traceback explains more than its exit.
        for obj in sorted(ready, key=lambda o: o in self._sentinels):
            if self._dead is not None:
                return
            if obj in self._sentinels:
                self._fail(f"{self._sentinels[obj]} exited unexpectedly")
            try:
                msg = recv_or_fail(obj, f"worker rank {self._rank_of[obj]}")
            except WorkerFailedError as exc:
                self._fail(str(exc))
            if msg[0] == "out":
                self._results[msg[1]] = msg[2]
            elif msg[0] == "error":
                self._fail(f"worker rank {msg[1]} failed:\n{msg[2]}")

    def _fail(self, reason: str, raise_: bool = True) -> None:
        if self._dead is None:
            logger.error("distributed executor failed: %s", reason)
            self._dead = reason
            self._finalizer.detach()
            _teardown(self.control, self.procs, grace_s=0.0)
        if raise_:
            raise WorkerFailedError(reason)

    # ---- health, stats, shutdown --------------------------------------------
    def check_health(self) -> None:
        """Raise WorkerFailedError if a worker died, hung or failed."""
        if self._dead is None:
            self._poll(0)
            for sentinel, who in self._sentinels.items():
                if self._dead is None and sentinel in wait_any([sentinel], timeout=0):
                    self._fail(f"{who} exited unexpectedly", raise_=False)
        if self._dead is not None:
            raise WorkerFailedError(self._dead)

    def control_stats(self) -> dict:
        return self.control.stats.summary()

    def batch_trace(self, timeout_s: float = 10.0) -> dict[int, list[tuple]]:
        """rank -> [(seq, control latency, start, compute start, end)] for its
        recent batches, wall-clock seconds (call with nothing in flight). The
        compute start is when the previous stage's hidden states arrived; these
        show the stages overlapping."""
        self.control.broadcast(("trace",))
        traces: dict[int, list[tuple]] = {}
        deadline = time.monotonic() + timeout_s
        while len(traces) < self.world_size and time.monotonic() < deadline:
            for conn in wait_any(list(self._rank_of), timeout=deadline - time.monotonic()):
                msg = recv_or_fail(conn, f"worker rank {self._rank_of[conn]}")
                if msg[0] == "trace":
                    traces[msg[1]] = msg[2]
        return traces

    def shutdown(self) -> None:
        """Stop every worker (gracefully, then by signal); safe to call twice."""
        self._finalizer()
        self.store = None  # closes the rendezvous port


def _teardown(control: ControlServer, procs, grace_s: float = 10.0) -> None:
    control.stop_all()  # every rank, local or remote, leaves its loop and exits
    stop_processes(procs, grace_s)
    control.close()
