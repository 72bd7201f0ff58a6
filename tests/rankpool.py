"""A pool of real processes in one gloo process group, reused across test cases.

Launching a process group costs seconds, so each world size gets one pool for the
whole test session and every check runs as a task on all of its ranks.  A task is
a module-level function ``fn(rank, world_size, *args)``; ``run`` returns the list
of per-rank results, or raises with the failing ranks' tracebacks.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import tempfile
import traceback

import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, tasks, results, sys_path: list[str]) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # report everything, the parent decides
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="stashpoint-rdzv-")
        os.close(fd)
        os.unlink(self._init_file)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, self._init_file, self._tasks[r], self._results, list(sys.path)),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 300.0) -> list:
        for q in self._tasks:
            q.put((fn.__module__, fn.__name__, args))
        out: dict[int, tuple[bool, object]] = {}
        while len(out) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close(kill=True)
                raise TimeoutError(f"{fn.__name__} did not finish on all ranks in {timeout}s") from None
            out[rank] = (ok, value)
        failed = {r: v for r, (ok, v) in out.items() if not ok}
        if failed:
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(failed)}:\n{details}")
        return [out[r][1] for r in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self._procs, self._tasks):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
        try:
            os.unlink(self._init_file)
        except FileNotFoundError:
            pass
