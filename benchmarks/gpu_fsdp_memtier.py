"""FSDP2 memory-tier benchmark on several GPUs: snapshot stall, throughput, restore.

One process per GPU (NCCL for the model, gloo for stashpoint's control traffic), the GPT
of ``gpu_fsdp_bench.py`` sharded with FSDP2, AdamW, ``--batch`` x ``--seq`` tokens per
rank and step.  Measured in one run:

* each rank's pinned device-to-host GB/s and state bytes, and from them the
  *link-limited* snapshot interval ceil(bytes per rank / D2H / step time);
* throughput with no checkpointing, with memory snapshots at the link-limited interval
  and every 10 steps (lazy copies into the keeper's slots, plans reused after the first);
* per snapshot: the training thread's stall (``stall_s``) and its phases;
* restore from memory (the keepers' shared memory, same layout) against a cold-cache
  load of the same step from disk.

Raw JSON to ``--out`` (rank 0 also writes ``--out.partial`` after each part)::

    python benchmarks/gpu_fsdp_memtier.py --gpus 2 --params 1.36e9 --out fsdp-memtier.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_fsdp_bench import _build, _drop_caches, _local_tensors, _step
from stashpoint import CheckpointManager
from stashpoint.engine.load import load_state
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import RetentionPolicy, SavePolicy


def _d2h_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def _manager(directory: str, every: int | None, durable_every: int = 10**9) -> CheckpointManager:
    memory = None if every is None else MemoryPolicy(every_steps=every, slots=3, signal=None)
    return CheckpointManager(
        directory,
        memory=memory,
        save_policy=SavePolicy(every_steps=durable_every),
        retention=RetentionPolicy(keep_last=1),
        mode="lazy",
        device_buffer=True,
    )


class Job:
    def __init__(self, args, device: torch.device, world: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg, self.model, self.optim = _build(args.params, device, world)
        self.args, self.device, self.loader = args, device, {"step": 0}

    def step(self) -> None:
        _step(self.cfg, self.model, self.optim, self.device, batch=self.args.batch, seq=self.args.seq)
        self.loader["step"] += 1

    def state(self) -> dict:
        return {"model": self.model, "optim": self.optim, "loader": self.loader}


def _run(job: Job, ctrl, directory: str, every: int | None, steps: int) -> dict:
    mgr = None if every is None else _manager(directory, every)
    if mgr is not None:
        mgr.warmup(job.state())
    torch.cuda.synchronize()
    dist.barrier(ctrl)
    stalls, phases, skipped = [], [], 0
    t = time.perf_counter()
    for _ in range(steps):
        job.step()
        if mgr is not None:
            h = mgr.maybe_save(job.loader["step"], job.state())
            if h is not None and hasattr(h, "slot"):
                stalls.append(h.stall_s)
                phases.append(dict(h.timer.seconds))
            elif job.loader["step"] % every == 0 and h is None:
                skipped += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = {"every": every, "steps": steps, "seconds": seconds, "stall_s": stalls, "phase_s": phases}
    out["skipped"] = skipped
    if mgr is not None:
        mgr.wait()
        mgr.close()
    dist.barrier(ctrl)
    return out


def _restore(args, job: Job, ctrl, device, world: int) -> dict:
    directory = os.path.join(args.dir, "restore")
    mgr = _manager(directory, 1, durable_every=1)
    job.step()
    mgr.maybe_save(job.loader["step"], job.state()).wait(900)  # snapshot + durable copy of it
    step = job.loader["step"]
    mgr.close(release_memory=False)
    other = Job(args, device, world, seed=1)
    other.step()
    torch.cuda.synchronize()
    dist.barrier(ctrl)
    t = time.perf_counter()
    mgr = _manager(directory, 1, durable_every=1)
    info = mgr.load_latest(other.state())
    torch.cuda.synchronize()
    memory_s = time.perf_counter() - t
    exact = info.tier == "memory" and info.step == step
    exact = exact and all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(job.model.parameters(), other.model.parameters())
    )
    phases = dict(mgr.recovered.result.phase_seconds)
    mgr.close()
    del other
    dist.barrier(ctrl)
    if dist.get_rank() == 0:
        _drop_caches()
    dist.barrier(ctrl)
    t = time.perf_counter()
    load_state(job.state(), os.path.join(directory, f"step-{step:09d}"))
    torch.cuda.synchronize()
    disk_s = time.perf_counter() - t
    return {"memory_s": memory_s, "memory_phases_s": phases, "disk_cold_s": disk_s, "bit_exact": exact}


def _partial(args, rank: int, key: str, value) -> None:
    if rank != 0:
        return
    path = args.out + ".partial"
    doc = json.load(open(path)) if os.path.exists(path) else {}
    doc[key] = value
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _measure(rank: int, world: int, args, device) -> dict:
    ctrl = dist.new_group(backend="gloo")
    job = Job(args, device, world)
    for _ in range(3):
        job.step()
    torch.cuda.synchronize()
    dist.barrier(ctrl)
    t = time.perf_counter()
    for _ in range(10):
        job.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / 10
    nbytes = sum(t.numel() * t.element_size() for t in _local_tensors(job.model, job.optim))
    d2h = _d2h_gbps(device)
    link = max(1, math.ceil(nbytes / (d2h * 1e9) / step_s))
    out = {"rank_state_bytes": nbytes, "d2h_gbps": d2h, "step_s": step_s, "link_every": link}
    out["entries"] = 4 * len(list(job.model.parameters()))
    _partial(args, rank, "limits", out)
    out["runs"] = []
    for every in (None, link, 10):
        out["runs"].append(_run(job, ctrl, os.path.join(args.dir, f"run-{every}"), every, args.steps))
        _partial(args, rank, "runs", out["runs"])
    out["restore"] = _restore(args, job, ctrl, device, world)
    _partial(args, rank, "restore", out["restore"])
    return out


def _worker(rank: int, world: int, args, init_file: str, results) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        out = _measure(rank, world, args, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, out, group=dist.new_group(backend="gloo"))
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--params", type=float, default=1.36e9)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dir", default="/tmp/sp-fsdp-memtier")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = tempfile.mktemp(prefix="sp-fsdp-memtier-")
    procs = [
        ctx.Process(target=_worker, args=(r, args.gpus, args, init_file, results)) for r in range(args.gpus)
    ]
    for p in procs:
        p.start()
    gathered = results.get()
    for p in procs:
        p.join()
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0),
        "world_size": args.gpus,
        "torch": torch.__version__,
        "args": vars(args),
        "ranks": gathered,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    r0 = gathered[0]
    base = r0["runs"][0]["seconds"]
    for run in r0["runs"]:
        stalls = sorted(run["stall_s"])
        med = stalls[len(stalls) // 2] if stalls else 0.0
        print(f"every {run['every']}: {base / run['seconds']:.3f} of no-ckpt, stall p50 {med * 1e3:.1f} ms")
    print("restore", json.dumps(r0["restore"]))


if __name__ == "__main__":
    main()
