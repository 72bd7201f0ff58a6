"""Run one function on N local CPU ranks (gloo, file rendezvous) and collect results.

Everything the ranks put in temporary space (the rendezvous file, torch's compile
cache) goes into one private directory that is removed when they are done, so a run
leaves nothing in ``/tmp``.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _entry(rank: int, world: int, scratch: str, fn, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TMPDIR"] = scratch
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    tempfile.tempdir = None  # look TMPDIR up again
    init_file = os.path.join(scratch, "rendezvous")
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
    with tempfile.TemporaryDirectory(prefix="stashpoint-demo-", ignore_cleanup_errors=True) as scratch:
        out = _run_in(scratch, world, fn, args, timeout_s, until_death=False)
    failed = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(out.items()) if not ok]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        raise RuntimeError(f"{len(failed)} rank(s) failed")
    return [out[r][1] for r in range(world)]


def run_until_a_rank_dies(world: int, fn, *args, timeout_s: float = 600.0) -> list[int]:
    """``fn`` on ``world`` processes until one dies; the others are then SIGKILLed, as
    torchrun's agent does before restarting a job.  Returns the exit codes."""
    with tempfile.TemporaryDirectory(prefix="stashpoint-demo-", ignore_cleanup_errors=True) as scratch:
        out = _run_in(scratch, world, fn, args, timeout_s, until_death=True)
    return [out[r][1] for r in range(world)]


def _run_in(
    scratch: str, world: int, fn, args: tuple, timeout_s: float, until_death: bool
) -> dict[int, tuple[bool, object]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, scratch, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world:
            if until_death and any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    if p.is_alive():
                        p.kill()
                for p in procs:
                    p.join(timeout=30)
                return {r: (False, p.exitcode) for r, p in enumerate(procs)}
            if time.monotonic() > deadline:
                raise queue.Empty
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                continue
            out[rank] = (ok, value)
    except queue.Empty:
        raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=30)
    return out
