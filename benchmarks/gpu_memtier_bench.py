"""GPU benchmark of the memory tier: snapshot cost, throughput, restore, kill-to-resume.

One run measures, on one GPU with the ~0.94B GPT of ``gpu_bench.py --part e2e`` and AdamW:

* the machine's limits (pinned device-to-host GB/s, fsync'd write GB/s, cold read GB/s)
  and from them the *link-limited* snapshot interval:
  ceil(state bytes / D2H bytes per second / step time) steps;
* training throughput with no checkpointing, with memory snapshots at the link-limited
  interval, every 10 steps, and at the link-limited interval plus durable checkpoints
  (written from the snapshots) at the disk-sustainable interval;
* per snapshot: the training thread's stall (telemetry ``stall_s``), shared and pinned
  memory after each snapshot (must stay constant);
* restore of the same state from memory against a cold-cache load from disk;
* wall time from a SIGKILL of the trainer process to its first resumed step (a new
  process: start, CUDA, model, recovery from memory, one step).

Writes raw JSON to ``--out`` (and ``--out.partial`` after each part).
Usage: ``python benchmarks/gpu_memtier_bench.py --out r.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import drop_caches, measure_limits
from stashpoint import CheckpointManager
from stashpoint.demo.model import GPTConfig, TinyGPT
from stashpoint.engine.load import load_state
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import RetentionPolicy, SavePolicy

CFG = GPTConfig(vocab=32000, dim=2048, heads=16, layers=16, mlp=8192, seq=1024)


class GPT:
    def __init__(self, batch: int, seed: int = 0, cfg: GPTConfig = CFG) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = TinyGPT(cfg).cuda()
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), device="cuda")
        self.loader = {"step": 0}
        self.batch = batch

    def step(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(self.tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, self.cfg.vocab), self.tokens[:, 1:].reshape(-1)
            )
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.loader["step"] += 1

    def state(self) -> dict:
        return {"model": self.model, "optim": self.optim, "loader": self.loader}

    @property
    def state_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for st in self.optim.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return total

    def entries(self) -> int:
        return len(list(self.model.parameters())) * 4


def shm_bytes(root: str | None) -> int:
    total = 0
    if root and os.path.isdir(root):
        for d, _, files in os.walk(root):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def run(tr: GPT, steps: int, durable: str, memory_every: int | None, durable_every: int | None) -> dict:
    """``steps`` training steps with the given tiers; throughput and per-snapshot numbers."""
    mgr, shm_start = None, 0
    if memory_every is not None or durable_every is not None:
        policy = (
            None if memory_every is None else MemoryPolicy(every_steps=memory_every, slots=3, signal=None)
        )
        mgr = CheckpointManager(
            durable,
            memory=policy,
            save_policy=SavePolicy(every_steps=durable_every or 10**9),
            retention=RetentionPolicy(keep_last=1),
            mode="lazy",
            device_buffer=True,
        )
        # outside the timed region: slots (and the device buffer) are allocated and pinned once
        mgr.warmup(tr.state())
        shm_start = shm_bytes(mgr.memory_root)
    torch.cuda.synchronize()
    stalls, phases, shm, skipped = [], [], [], 0
    t = time.perf_counter()
    for _ in range(steps):
        tr.step()
        if mgr is not None:
            h = mgr.maybe_save(tr.loader["step"], tr.state())
            if h is not None and hasattr(h, "slot"):
                stalls.append(h.stall_s)
                phases.append(dict(h.timer.seconds))
            elif memory_every and tr.loader["step"] % memory_every == 0 and h is None:
                skipped += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = {
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": steps * tr.batch * CFG.seq / seconds,
        "snapshots": len(stalls),
        "skipped": skipped,
        "stall_s": stalls,
        "phase_s": phases,
    }
    if mgr is not None:
        t = time.perf_counter()
        mgr.wait()
        out["drain_s"] = time.perf_counter() - t
        out["shm_bytes_after_warmup"] = shm_start
        out["shm_bytes"] = shm_bytes(mgr.memory_root)
        shm.append(out["shm_bytes"])
        out["memory_root"] = mgr.memory_root
        mgr.close()
    return out


def stalls(entries_x: int, batch: int, durable: str, snapshots: int = 12) -> dict:
    """The training thread's time per lazy snapshot for a model with ``entries_x`` times the
    GPT's layers (narrower, so the state stays about the same size)."""
    cfg = GPTConfig(
        vocab=32000, dim=2048 // entries_x, heads=16, layers=16 * entries_x, mlp=8192 // entries_x, seq=1024
    )
    tr = GPT(batch, cfg=cfg)
    tr.step()
    policy = MemoryPolicy(every_steps=1, slots=3, signal=None)
    mgr = CheckpointManager(
        durable, memory=policy, save_policy=SavePolicy(every_steps=10**9), mode="lazy", device_buffer=True
    )
    mgr.warmup(tr.state())
    out = {"entries": tr.entries(), "state_bytes": tr.state_bytes, "stall_s": [], "phase_s": []}
    for i in range(snapshots):
        tr.step()
        if i == snapshots - 2:  # one snapshot profiled, once everything is warm
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
        h = mgr.snapshot(tr.loader["step"], tr.state())
        if i == snapshots - 2:
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            out["profile"] = text.getvalue()[-6000:]
        if h is not None:
            out["stall_s"].append(h.stall_s)
            out["phase_s"].append(dict(h.timer.seconds))
            h.wait(120)
    mgr.close()
    del tr
    torch.cuda.empty_cache()
    return out


def restore(tr: GPT, durable: str) -> dict:
    """Memory restore against a cold-cache disk load of the same step."""
    policy = MemoryPolicy(every_steps=1, slots=3, signal=None)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=1))
    tr.step()
    mgr.maybe_save(tr.loader["step"], tr.state()).wait(900)  # memory snapshot + durable copy of it
    step = tr.loader["step"]
    mgr.close(release_memory=False)
    other = GPT(tr.batch, seed=1)
    other.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=1))
    info = mgr.load_latest(other.state())
    torch.cuda.synchronize()
    memory_s = time.perf_counter() - t
    assert info.tier == "memory" and info.step == step, info
    same = all(torch.equal(a, b) for a, b in zip(tr.model.parameters(), other.model.parameters()))
    mgr.close()
    cold = drop_caches()
    third = GPT(tr.batch, seed=2)
    third.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    load_state(third.state(), os.path.join(durable, f"step-{step:09d}"))
    torch.cuda.synchronize()
    disk_s = time.perf_counter() - t
    return {
        "memory_s": memory_s,
        "memory_recovery_s": mgr.recovered.seconds,
        "memory_load_phases_s": dict(mgr.recovered.result.phase_seconds),
        "disk_cold_s": disk_s,
        "cache_dropped": cold,
        "speedup": disk_s / memory_s,
        "bit_exact": same,
    }


def child(args) -> None:
    """A trainer process: resume (memory tier), train, snapshot every step; prints timings."""
    t_start = float(args.t0)
    tr = GPT(args.batch)
    policy = MemoryPolicy(every_steps=1, slots=2, signal=None, reattach_s=120)
    mgr = CheckpointManager(
        args.dir, memory=policy, save_policy=SavePolicy(every_steps=10**9), mode="lazy", device_buffer=True
    )
    t_ready = time.time()
    state = tr.state()
    info = mgr.load_latest(state)
    tr.loader = state["loader"]
    torch.cuda.synchronize()
    t_loaded = time.time()
    for _ in range(args.child_steps):
        tr.step()
        torch.cuda.synchronize()
        if tr.loader["step"] == (info.step if info else 0) + 1:
            print(
                json.dumps(
                    {
                        "event": "first_step",
                        "resumed": None if info is None else [info.tier, info.step],
                        "since_t0": time.time() - t_start,
                        "setup_s": t_ready - t_start,
                        "recover_s": t_loaded - t_ready,
                    }
                ),
                flush=True,
            )
        mgr.maybe_save(tr.loader["step"], tr.state()).wait(120)
        print(json.dumps({"event": "snapshot", "step": tr.loader["step"]}), flush=True)
    mgr.close(release_memory=args.release)


def kill_and_resume(args) -> dict:
    """SIGKILL a trainer after its snapshots, start a new one: wall time to its first step."""
    d = os.path.join(args.dir, "kill")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cmd = [sys.executable, __file__, "--child", "--dir", d, "--batch", str(args.batch)]
    cmd += ["--child-steps", "1000"]
    p = subprocess.Popen([*cmd, "--t0", str(time.time())], stdout=subprocess.PIPE, text=True)
    last = None
    for line in p.stdout:
        ev = json.loads(line)
        if ev["event"] == "snapshot":
            last = ev["step"]
            if last >= 5:
                break
    t_kill = time.time()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    resume = [*cmd[:-1], "3", "--release", "--t0", str(t_kill)]
    q = subprocess.Popen(resume, stdout=subprocess.PIPE, text=True)
    first = None
    for line in q.stdout:
        ev = json.loads(line)
        if ev["event"] == "first_step":
            first = ev
    q.wait(300)
    return {"killed_after_step": last, "first_resumed_step": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="memtier.json")
    ap.add_argument("--dir", default="/tmp/stashpoint-memtier")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--parts", default="limits,throughput,stalls,restore,kill")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--child-steps", type=int, default=1000)
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--t0", default="0")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    os.makedirs(args.dir, exist_ok=True)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        with open(args.out + ".partial", "w") as f:
            json.dump(out, f, indent=1)

    parts = args.parts.split(",")
    default = {"d2h_pinned_gbps": 50.0, "fsync_write_gbps": 2.0}
    lim = measure_limits(args.dir, 4.0) if "limits" in parts else default
    out["limits"] = lim
    save()
    tr = GPT(args.batch)
    for _ in range(5):
        tr.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        tr.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / 10
    link_every = max(1, math.ceil(tr.state_bytes / (lim["d2h_pinned_gbps"] * 1e9) / step_s))
    disk_every = max(1, round(1.25 * tr.state_bytes / (lim["fsync_write_gbps"] * 1e9) / step_s))
    out.update(
        state_bytes=tr.state_bytes,
        entries=tr.entries(),
        step_s=step_s,
        link_limited_every=link_every,
        disk_sustainable_every=disk_every,
        runs={},
    )
    print(f"{tr.state_bytes / 1e9:.1f} GB, {step_s * 1e3:.0f} ms/step, link {link_every}, disk {disk_every}")
    save()
    if "throughput" in parts:
        plans = {
            "none": (None, None),
            f"memory_every_{link_every}": (link_every, None),
            "memory_every_10": (10, None),
            f"memory_every_{link_every}+durable_every_{disk_every}": (link_every, disk_every),
        }
        for name, (mem, dur) in plans.items():
            d = os.path.join(args.dir, name)
            shutil.rmtree(d, ignore_errors=True)
            steps = max(args.steps, 2 * dur) if dur else args.steps
            r = run(tr, steps, d, mem, dur)
            out["runs"][name] = r
            base = out["runs"]["none"]["tokens_per_s"]
            r["vs_no_checkpoint"] = r["tokens_per_s"] / base
            p50 = sorted(r["stall_s"] or [0.0])[len(r["stall_s"]) // 2]
            print(name, f"{r['vs_no_checkpoint']:.4f}", f"stall p50 {p50 * 1e3:.1f} ms", flush=True)
            save()
            shutil.rmtree(d, ignore_errors=True)
    if "stalls" in parts:
        for x in (1, 4):
            d = os.path.join(args.dir, f"stalls-{x}")
            r = out.setdefault("stalls", {})[f"x{x}"] = stalls(x, args.batch, d)
            p50 = sorted(r["stall_s"])[len(r["stall_s"]) // 2]
            print(f"stalls x{x}: {r['entries']} entries, p50 {p50 * 1e3:.1f} ms", flush=True)
            save()
            shutil.rmtree(d, ignore_errors=True)
    if "restore" in parts:
        d = os.path.join(args.dir, "restore")
        shutil.rmtree(d, ignore_errors=True)
        out["restore"] = restore(tr, d)
        print("restore", out["restore"])
        save()
        shutil.rmtree(d, ignore_errors=True)
    if "kill" in parts:
        del tr
        torch.cuda.empty_cache()
        out["kill"] = kill_and_resume(args)
        print("kill", out["kill"])
        save()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
