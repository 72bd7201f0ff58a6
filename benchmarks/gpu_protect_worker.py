"""A trainer process of ``gpu_protect_bench.py``: one rank, one simulated node.

Every rank trains its own GPT on its own data (no gradient exchange: no DDP, nothing
sharded), all ranks on the same device; the ranks form one gloo process group, used only
by stashpoint's control traffic and the benchmark's barriers.  The state is marked
``PerRank`` so that each rank's snapshot holds its whole model and optimizer (unmarked
module tensors would be taken for DDP replicas and written once for all ranks).

Roles (``--role``): ``bench`` (limits and the throughput runs), ``train`` (snapshots
with parity and a durable checkpoint, then trains on until it is killed) and
``resume`` (a restarted trainer: recovery, the first step, the cold disk load).
Each prints JSON lines (``{"event": ...}``) on stdout for the driver.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import drop_caches
from gpu_protect_bench import node_dir
from stashpoint import CheckpointManager, Parity, PerRank, Replicate
from stashpoint.demo.model import GPTConfig, TinyGPT
from stashpoint.engine import keepers, memtier
from stashpoint.engine.load import load_state
from stashpoint.engine.rebuild import held_bytes
from stashpoint.engine.snapshot import SnapshotHandle
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import RetentionPolicy, SavePolicy

SLOTS = 2
TIMEOUT_S = 600.0


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Trainer:
    """A GPT, AdamW and a batch of this rank's own tokens on ``args.device``."""

    def __init__(self, args, seed: int) -> None:
        torch.manual_seed(seed)
        self.args, self.cuda = args, args.device.startswith("cuda")
        sizes = {k: getattr(args, k) for k in ("vocab", "dim", "heads", "layers", "seq")}
        self.cfg = GPTConfig(mlp=4 * args.dim, **sizes)
        self.model = TinyGPT(self.cfg).to(args.device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.cuda)
        self.tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
        self.loader = {"step": 0}

    def step(self) -> None:
        with torch.autocast(self.args.device.split(":")[0], dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.model(self.tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, self.cfg.vocab), self.tokens[:, 1:].reshape(-1)
            )
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.loader["step"] += 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def state(self) -> dict:
        return {"model": PerRank(self.model), "optim": PerRank(self.optim), "loader": PerRank(self.loader)}

    def adopt(self, state: dict) -> None:
        """Take the loaded data-loader position (the load may replace the entry)."""
        loader = state["loader"]
        self.loader = loader.value if isinstance(loader, PerRank) else loader

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.model.parameters())
        for p in self.model.parameters():
            st = self.optim.state.get(p, {})
            out += [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
        return out

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def fingerprint(self) -> str:
        """A digest of every byte of the weights and optimizer state, computed on the device."""
        sums = []
        for t in self.tensors():
            b = t.detach().contiguous().view(-1).view(torch.uint8)
            n = b.numel() // 4 * 4
            w = b[:n].view(torch.int32).to(torch.int64)
            pos = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
            sums.append(int((w * pos).sum().item()) + int(b[n:].to(torch.int64).sum().item()))
        return hashlib.sha256(repr(sums).encode()).hexdigest()[:16]


def gather(value: object) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def manager(args, rank: int, directory: str, key: str, every: int, protection, **kw) -> CheckpointManager:
    policy = MemoryPolicy(
        every_steps=every,
        slots=SLOTS,
        if_busy=kw.pop("if_busy", "skip"),
        signal=None,
        reattach_s=120,
        key=key,
        shm_dir=node_dir(args, rank),
        protection=protection,
        ranks_per_node=1,
        peer_transport=kw.pop("transport", args.transport),
        listen_host="127.0.0.1",
    )
    return CheckpointManager(
        directory,
        memory=policy,
        save_policy=SavePolicy(every_steps=kw.pop("durable_every", 10**9)),
        retention=RetentionPolicy(keep_last=1),
        mode="lazy",
        device_buffer=args.device.startswith("cuda"),
        timeout_s=TIMEOUT_S,
    )


def copy_seconds(tr: Trainer, src: torch.Tensor, dst: torch.Tensor, active: bool) -> float:
    """Three device-to-host copies into pinned memory, timed between barriers; 0 if not ``active``."""
    seconds = 0.0
    dist.barrier()
    if active:
        t = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=tr.cuda)
        tr.sync()
        seconds = time.perf_counter() - t
    dist.barrier()
    return seconds


def limits(args, tr: Trainer, rank: int, world: int) -> dict:
    """Shared and solo D2H rate, step time with every rank training, the link-limited interval."""
    nbytes = args.d2h_mib << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=tr.cuda)
    copy_seconds(tr, src, dst, True)  # warm
    solo = 3 * nbytes / gather(copy_seconds(tr, src, dst, rank == 0))[0] / 1e9
    seconds = gather(copy_seconds(tr, src, dst, True))
    shared = world * 3 * nbytes / max(seconds) / 1e9  # every rank copying at once, on one link
    del src, dst
    for _ in range(3):
        tr.step()
    tr.sync()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(args.time_steps):
        tr.step()
    tr.sync()
    dist.barrier()
    step_s = (time.perf_counter() - t) / args.time_steps
    nbytes = tr.state_bytes
    every = max(1, math.ceil(nbytes * world / (shared * 1e9) / step_s))
    return {
        "device": torch.cuda.get_device_name() if tr.cuda else "cpu",
        "torch": torch.__version__,
        "params_per_rank": tr.params,
        "state_bytes_per_rank": nbytes,
        "d2h_solo_gbps": solo,
        "d2h_shared_gbps": shared,
        "d2h_shared_seconds": seconds,
        "step_s": step_s,
        "link_limited_every": every,
    }


def shm_use(root: str, rank: int) -> dict:
    """Bytes of the node's memory root: its slots, and what it holds for other nodes."""
    total = 0
    for d, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    slots = [memtier.slot_data(root, rank, i) for i in range(SLOTS)]
    shard = max((os.path.getsize(p) for p in slots if os.path.exists(p)), default=0)
    out = {"root_bytes": total, "held_bytes": held_bytes(root), "shard_bytes": shard}
    return {**out, "slots_x_shard": SLOTS * shard}


def release(mgr: CheckpointManager, root: str, rank: int) -> None:
    """Close (the keeper frees the memory and exits), then remove what is left of the root."""
    mgr.close()
    dist.barrier()  # every keeper released: no one writes into this node's root any more
    deadline = time.monotonic() + 60
    while keepers.keeper_alive(root, rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(root, ignore_errors=True)
    dist.barrier()


def timed_run(args, tr: Trainer, rank: int, name: str, every: int | None, protection, transport: str) -> dict:
    """``args.steps`` steps, barrier-timed; snapshots every ``every`` steps (None: no checkpointing)."""
    mgr = None
    if every is not None:
        mgr = manager(
            args, rank, os.path.join(args.dir, name), f"bench-{name}", every, protection, transport=transport
        )
        mgr.warmup(tr.state())  # slots allocated and pinned outside the timed region
    tr.sync()
    dist.barrier()
    handles, skipped = [], 0
    t = time.perf_counter()
    for _ in range(args.steps):
        tr.step()
        if mgr is not None:
            h = mgr.maybe_save(tr.loader["step"], tr.state())
            if isinstance(h, SnapshotHandle):
                handles.append(h)
            elif h is None and tr.loader["step"] % every == 0:
                skipped += 1
    tr.sync()
    dist.barrier()
    seconds = time.perf_counter() - t
    out = {
        "name": name,
        "every": every,
        "protection": repr(protection),
        "transport": transport,
        "seconds": seconds,
    }
    out.update(steps=args.steps, tokens=args.steps * args.batch * args.seq)
    if mgr is None:
        return out
    t = time.perf_counter()
    phases = [dict(h.wait(TIMEOUT_S).phase_seconds) for h in handles]
    out["drain_s"] = time.perf_counter() - t
    out.update(snapshots=len(handles), skipped=skipped, stall_s=[h.stall_s for h in handles], phase_s=phases)
    dist.barrier()  # every keeper has protected every snapshot
    out["memory"] = shm_use(mgr.memory_root, rank)
    release(mgr, mgr.memory_root, rank)
    return out


def shm_needed(world: int, state_bytes: int, protection) -> int:
    """Shared memory a run takes on the host: every rank's slots and the protection."""
    slots = world * SLOTS * state_bytes
    if isinstance(protection, Replicate):
        return slots * (1 + protection.copies)
    if isinstance(protection, Parity):
        return slots + math.ceil(world / protection.group) * SLOTS * state_bytes
    return slots


def host_room(shm: str) -> int:
    """Bytes the shared memory file system and the host's available memory both still have."""
    st = os.statvfs(shm)
    room = st.f_bavail * st.f_frsize
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return min(room, avail)


def bench(args, rank: int, world: int) -> None:
    tr = Trainer(args, seed=1000 + rank)
    lim = limits(args, tr, rank, world)
    if rank == 0:
        emit("limits", **lim)
    every = lim["link_limited_every"]
    parity = Parity(group=args.group)
    plans = [
        ("none", None, None, "files"),
        (f"memory_every_{every}", every, None, "files"),
        (f"parity{args.group}_every_{every}", every, parity, "files"),
        (f"parity{args.group}_sockets_every_{every}", every, parity, "sockets"),
        (f"replicate1_every_{every}", every, Replicate(copies=1), "files"),
        (f"parity{args.group}_every_10", 10, parity, "files"),
    ]
    deadline = args.t0 + args.budget_s
    for name, k, protection, transport in plans:
        needed = shm_needed(world, lim["state_bytes_per_rank"], protection)
        room = host_room(args.shm)
        least = {Parity: args.group + 1, Replicate: 2}.get(type(protection), 1)
        why = None
        if world < least:
            why = f"{protection!r} needs {least} nodes"
        elif needed > 0.9 * room and k is not None:
            why = f"needs {needed / 1e9:.1f} GB of shared memory, the host has {room / 1e9:.1f} GB"
        elif time.time() + 1.5 * args.steps * lim["step_s"] + 30 > deadline:
            why = f"out of time (budget {args.budget_s:g}s)"
        why = gather(why)[0]  # rank 0 decides for everyone
        if why is not None:
            if rank == 0:
                emit("skipped", name=name, why=why)
            continue
        emit("run", rank=rank, **timed_run(args, tr, rank, name, k, protection, transport))
    dist.barrier()


def train(args, rank: int, world: int) -> None:
    """Snapshots with parity every ``loss_every`` steps, the last one also durable (written
    from the snapshot); then trains on until the driver kills it."""
    tr = Trainer(args, seed=1000 + rank)
    mgr = manager(
        args, rank, os.path.join(args.dir, "nodeloss"), "nodeloss", args.loss_every, Parity(group=args.group),
        if_busy="wait",
    )
    phases = []
    for _ in range(args.loss_steps):
        tr.step()
        step = tr.loader["step"]
        if step % args.loss_every == 0 or step == args.loss_steps:
            durable = step == args.loss_steps
            snap = mgr.snapshot(step, tr.state(), durable=durable)
            if durable:
                mgr.save(step, tr.state()).wait(TIMEOUT_S)
            phases.append(dict(snap.wait(TIMEOUT_S).phase_seconds))
    mgr.wait()
    dist.barrier()  # every snapshot is protected and the durable checkpoint committed
    emit(
        "ready", rank=rank, step=tr.loader["step"], fingerprint=tr.fingerprint(), phase_s=phases,
        memory=shm_use(mgr.memory_root, rank),
    )
    end = time.time() + 300
    while time.time() < end:
        tr.step()
        tr.sync()


def resume(args, rank: int, world: int) -> None:
    """A restarted trainer: recover (the lost rank rebuilt from parity), one step; rank 0 then
    loads the same step cold from disk.  Reports wall-clock times for the driver."""
    t_started = time.time()
    tr = Trainer(args, seed=2000 + rank)
    protection = Parity(group=args.group)
    mgr = manager(args, rank, os.path.join(args.dir, "nodeloss"), "nodeloss", args.loss_every, protection)
    t_ready = time.time()
    state = tr.state()
    info = mgr.load_latest(state)
    tr.adopt(state)
    tr.sync()
    t_loaded = time.time()
    step = tr.loader["step"]
    got = tr.fingerprint()
    expected = json.load(open(args.expect))
    tr.step()
    tr.sync()
    t_first = time.time()
    rec = mgr.recovered
    emit(
        "resumed", rank=rank, tier=None if info is None else info.tier, step=step,
        bit_exact=got == expected[str(rank)],
        at={"main": t_started, "ready": t_ready, "loaded": t_loaded, "first_step": t_first},
        recovery_s=None if rec is None else rec.seconds,
        load_phase_s=None if rec is None or rec.result is None else dict(rec.result.phase_seconds),
    )
    solo = dist.new_group([0], backend="gloo")
    dist.barrier()
    if rank == 0:
        del tr
        cold = drop_caches()
        other = Trainer(args, seed=3000)
        other.sync()
        t = time.perf_counter()
        result = load_state(
            other.state(), os.path.join(args.dir, "nodeloss", f"step-{step:09d}"),
            process_group=solo, per_rank="rank0", timeout_s=TIMEOUT_S,
        )
        other.sync()
        emit(
            "disk", rank=rank, step=step, cold_load_s=time.perf_counter() - t, cache_dropped=cold,
            bit_exact=other.fingerprint() == expected["0"], load_phase_s=dict(result.phase_seconds),
        )
    dist.barrier()
    mgr.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("bench", "train", "resume"), required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--config", required=True, help="the driver's arguments, as JSON")
    ap.add_argument("--expect", default="")
    own = ap.parse_args()
    args = argparse.Namespace(**json.load(open(own.config)))
    args.expect = own.expect
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"file://{own.init}", rank=own.rank, world_size=own.world)
    try:
        {"bench": bench, "train": train, "resume": resume}[own.role](args, own.rank, own.world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
