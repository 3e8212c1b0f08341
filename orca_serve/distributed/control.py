"""The control plane between the driver (engine) and the worker ranks.

Orca keeps the scheduler in one process and sends each iteration a small
control message; tensors never pass through the driver. Control messages are
plain Python objects, so they travel over ``multiprocessing.connection``
(TCP, HMAC-authenticated with a per-engine key), one connection per rank:
sending returns at once (the message lands in the socket buffer), a dead rank
shows up as end-of-file, and the driver can wait on results, errors and
process exits in one ``wait`` call. Tensor traffic between workers
(all-reduce, stage-to-stage hidden states) goes over torch.distributed.

Driver -> every rank: ``("go",)`` once every rank has connected, then
``("batch", seq, SchedulerOutput, sent_at)``, ``("trace",)`` or ``None``
(stop). Rank -> driver: ``("hello", rank, pid)``,
``("ready", rank, info)``, ``("out", seq, ModelRunnerOutput)`` (the last
stage's TP rank 0 only), ``("trace", rank, records)``, ``("error", rank, text, message)`` (message: a
ValueError's, else None).
"""
from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.connection import wait as wait_any

logger = logging.getLogger(__name__)


class WorkerFailedError(RuntimeError):
    """A worker rank died, hung or raised; the executor is unusable."""


class WorkerSettingError(WorkerFailedError, ValueError):
    """A worker rank refused the engine's settings while starting (its ValueError)."""


@dataclass
class ControlStats:
    """Cost of the per-iteration control messages, measured on the driver."""

    num_messages: int = 0
    total_bytes: int = 0
    max_bytes: int = 0
    total_send_s: float = 0.0  # pickling + writing to every rank's socket

    def record(self, nbytes: int, seconds: float) -> None:
        self.num_messages += 1
        self.total_bytes += nbytes
        self.max_bytes = max(self.max_bytes, nbytes)
        self.total_send_s += seconds

    def summary(self) -> dict:
        n = max(1, self.num_messages)
        return dict(messages=self.num_messages, mean_bytes=self.total_bytes / n, max_bytes=self.max_bytes,
                    mean_send_us=1e6 * self.total_send_s / n)


class ControlServer:
    """Driver side: one authenticated connection per rank."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address = self._listener.address
        self.conns: dict[int, Connection] = {}
        self._accepted: queue.Queue = queue.Queue()
        self.stats = ControlStats()

    def wait_ready(self, world_size: int, timeout_s: float, sentinels: dict[int, str]) -> dict[int, dict]:
        """Accept every rank and wait for its "ready" (model loaded). Returns rank -> info.

        Raises WorkerFailedError if a rank reports an error, a local process
        (``sentinels``: process sentinel -> description) exits, or time runs out.
        """
        threading.Thread(target=self._accept_loop, args=(world_size,), daemon=True).start()
        pending: list[Connection] = []
        info: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(info) < world_size:
            while not self._accepted.empty():
                pending.append(self._accepted.get())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailedError(f"only {len(info)} of {world_size} worker ranks were ready "
                                        f"within {timeout_s:.0f}s")
            for obj in wait_any(pending + list(sentinels), timeout=min(remaining, 0.05)):
                if obj in sentinels:
                    raise WorkerFailedError(f"{sentinels[obj]} exited during start-up")
                msg = recv_or_fail(obj, "a worker rank")
                if msg[0] == "hello":
                    self.conns[msg[1]] = obj
                    if len(self.conns) == world_size:
                        # Everyone is here (other nodes may start late): the ranks may now
                        # form their process group, whose timeout then only covers connecting.
                        self.broadcast(("go",))
                elif msg[0] == "ready":
                    info[msg[1]] = msg[2]
                elif msg[0] == "error":
                    if len(msg) > 3 and msg[3] is not None:
                        logger.debug("worker rank %d failed to start:\n%s", msg[1], msg[2])
                        raise WorkerSettingError(f"worker rank {msg[1]}: {msg[3]}")
                    raise WorkerFailedError(f"worker rank {msg[1]} failed to start:\n{msg[2]}")
        return info

    def _accept_loop(self, n: int) -> None:
        accepted = 0
        while accepted < n:
            try:
                conn = self._listener.accept()
            except OSError:  # listener closed: start-up is over
                return
            except Exception:  # a client with the wrong key: ignore it, keep accepting
                logger.warning("rejected a control connection", exc_info=True)
                continue
            self._accepted.put(conn)
            accepted += 1

    def broadcast(self, message) -> int:
        """Pickle once, send to every rank; returns the message size in bytes."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns.values():
            conn.send_bytes(payload)
        return len(payload)

    def stop_all(self) -> None:
        """Tell every rank to exit its loop; ranks that are gone are skipped."""
        payload = pickle.dumps(None)
        for conn in self.conns.values():
            try:
                conn.send_bytes(payload)
            except OSError:
                pass

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass
        try:
            self._listener.close()
        except OSError:
            pass


def recv_or_fail(conn: Connection, who: str):
    try:
        return conn.recv()
    except (EOFError, OSError) as exc:
        raise WorkerFailedError(f"{who} closed its control connection (process died?)") from exc


def connect(address, authkey: bytes, rank: int, pid: int) -> Connection:
    """Worker side: open this rank's control connection, introduce it, and wait
    until every rank (on every node) has done the same."""
    conn = Client(address, authkey=authkey)
    conn.send(("hello", rank, pid))
    msg = conn.recv()
    if msg is None:
        raise EOFError("the driver stopped during start-up")
    return conn
