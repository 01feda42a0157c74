"""A pool of gloo ranks kept alive across tests, so multi-rank tests cost one spawn per world size.

`pool.run(fn, *args)` calls the module-level function `fn(rank, world_size, *args)` on every rank
and returns the per-rank results; an exception on any rank is re-raised here with its rank. Every
wait is bounded, so a hang fails the test instead of the CI job."""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

TIMEOUT_S = 180


class RankError(Exception):
    """fn raised on a rank: .rank, .exc_type (name), .message."""

    def __init__(self, rank: int, exc_type: str, message: str, tb: str):
        super().__init__(f"rank {rank}: {exc_type}: {message}\n{tb}")
        self.rank, self.exc_type, self.message = rank, exc_type, message


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs, results) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException as e:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.broken = False
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.jobs[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run_all(self, fn, *args) -> list[tuple[bool, object]]:
        """(ok, result-or-(type, message, traceback)) per rank."""
        for q in self.jobs:
            q.put((fn, args))
        out: list = [None] * self.world_size
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=TIMEOUT_S)
                out[rank] = (ok, value)
        except queue.Empty:
            self.broken = True
            self.close()
            raise TimeoutError(f"{fn.__name__} did not finish on every rank in {TIMEOUT_S} s") from None
        return out

    def run(self, fn, *args) -> list:
        """fn's result on every rank; raises RankError for the first rank that raised."""
        out = self.run_all(fn, *args)
        for rank, (ok, value) in enumerate(out):
            if not ok:
                raise RankError(rank, *value)
        return [value for _, value in out]

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=0 if self.broken else 10)
            if p.is_alive():
                p.kill()
