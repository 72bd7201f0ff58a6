"""Run one function on N local CPU ranks (gloo, file rendezvous) and collect results."""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import traceback

import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 600.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` fresh processes; returns per-rank results."""
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="stashpoint-rdzv-")
    os.close(fd)
    os.unlink(init_file)
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, init_file, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple[bool, object]] = {}
    try:
        while len(out) < world:
            rank, ok, value = results.get(timeout=timeout_s)
            out[rank] = (ok, value)
    except queue.Empty:
        raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(out.items()) if not ok]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        raise RuntimeError(f"{len(failed)} rank(s) failed")
    return [out[r][1] for r in range(world)]
