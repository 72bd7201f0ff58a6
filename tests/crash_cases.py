"""A rank killed with SIGKILL in the middle of a save (run in fresh processes)."""

from __future__ import annotations

import os
import signal
import sys


def crash_worker(rank: int, world: int, init_file: str, root: str, victim: int, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    import stashpoint
    from stashpoint.storage import local

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)  # same on every rank: stored once
    state = {
        "w": torch.randn(64, 1024, generator=g),
        "rank_rows": stashpoint.PerRank(torch.full((8,), float(rank))),
    }
    stashpoint.save(state, os.path.join(root, "good"), timeout_s=20)

    if rank == victim:
        real_write_at = local._FileWriter.write_at

        def dying_write_at(self, offset, data):
            view = memoryview(data).cast("B")
            if offset > 0:  # past the header: half of a chunk reaches the disk, then death
                real_write_at(self, offset, view[: len(view) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_write_at(self, offset, view)

        local._FileWriter.write_at = dying_write_at
    state["w"].add_(1)
    try:
        stashpoint.save(state, os.path.join(root, "doomed"), timeout_s=20)
        results.put((rank, "saved"))
    except stashpoint.errors.StashpointError as exc:
        results.put((rank, type(exc).__name__))
    sys.exit(0)
