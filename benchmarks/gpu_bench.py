"""GPU checkpoint benchmark: stashpoint against torch.save and DCP, with the machine's limits.

Run on a CUDA machine.  Every part writes one JSON file of raw numbers; the machine's
limits are measured in the same run as the tools so ratios are meaningful.

Parts (``--part``):

* ``limits``: pinned device-to-host GB/s, fsync'd write GB/s, cold read GB/s.
* ``single``: a state of ``--params`` parameters on one GPU (bf16 weights, fp32
  master weights, two fp32 Adam moments: 1.3e9 parameters are 16.95 GiB); for each
  tool ``--saves`` consecutive saves with a training step between them.  Per save:
  stall of the training thread, time to durable commit, host memory peak; then a
  cold-cache load.
* ``e2e``: a GPT of about 1B parameters trained with AdamW; throughput with no
  checkpoints and with a checkpoint every disk-sustainable interval
  (1.25 x state bytes / measured write speed), per tool.
* ``fsdp``: the same per-save measurements for an FSDP2-sharded model on all
  visible GPUs (one process per GPU), and loads at the same and another world size.

Stall is the time the training thread is blocked by the save call (plus, for
lazy saves, the extra time of the next optimizer step over a step without a
pending save).  Usage: ``python benchmarks/gpu_bench.py --part single --out r.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import torch

import stashpoint

GiB = 1 << 30


# ----------------------------------------------------------------------------- helpers


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class RSSPeak:
    """Peak resident memory of this process and its children (the writer), sampled."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> RSSPeak:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# ----------------------------------------------------------------------------- limits


def fsync_write_gbps(path: str, nbytes: int, chunk: memoryview) -> float:
    """Sequential ``write`` of ``nbytes`` in ``chunk``-sized pieces, then ``fsync``; GB/s."""
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    while written < nbytes:
        written += os.write(fd, chunk)
    os.fsync(fd)
    os.close(fd)
    return written / (time.perf_counter() - t) / 1e9


def measure_limits(directory: str, gib: float = 8.0) -> dict:
    out = {}
    n = int(gib * GiB)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    out["d2h_pinned_gbps"] = 3 * n / (time.perf_counter() - t) / 1e9
    del dev
    # fsync'd sequential write of a large file, 64 MiB writes from pinned memory
    path = os.path.join(directory, "limits.bin")
    out["fsync_write_gbps"] = fsync_write_gbps(path, n, memoryview(host.numpy())[: 64 << 20])
    out["cache_dropped"] = drop_caches()
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    got = 0
    while True:
        k = os.readv(fd, [buf])
        if not k:
            break
        got += k
    os.close(fd)
    out["cold_read_gbps"] = got / (time.perf_counter() - t) / 1e9
    os.unlink(path)
    del host
    gc.collect()
    return out


# ----------------------------------------------------------------------------- the 17 GB state


class Trainer:
    """bf16 weights + fp32 master weights + AdamW moments, on one GPU."""

    def __init__(self, params: float, layers: int = 24) -> None:
        # square layers of width d: layers * d * d ~= params
        d = int((params / layers) ** 0.5) // 64 * 64
        self.model = torch.nn.ModuleList(
            torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(layers)
        )
        self.master = torch.nn.ModuleList(
            torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.float32) for _ in range(layers)
        )
        with torch.no_grad():
            for a, b in zip(self.model.parameters(), self.master.parameters()):
                b.copy_(a)
                b.grad = torch.randn_like(b) * 1e-3
        self.optim = torch.optim.AdamW(self.master.parameters(), lr=1e-5, fused=True)
        self.optim.step()
        self.work = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        torch.cuda.synchronize()

    @property
    def state_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        total += sum(p.numel() * p.element_size() for p in self.master.parameters())
        for st in self.optim.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return total

    def forward_backward(self, ms: float = 100.0) -> None:
        """Stand-in for a forward/backward: about ``ms`` of matrix products."""
        for _ in range(max(1, int(ms / 1.4))):
            self.work = (self.work @ self.work).clamp_(-1, 1)

    def step(self) -> None:
        self.optim.step()
        with torch.no_grad():
            torch._foreach_copy_(list(self.model.parameters()), list(self.master.parameters()))

    def stashpoint_state(self) -> dict:
        return {
            "model": self.model,
            "master": self.master,
            "optim": stashpoint.OptimizerState(self.optim, self.master),
        }

    def dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "model": get_model_state_dict(self.model),
            "master": get_model_state_dict(self.master),
            "optim": get_optimizer_state_dict(self.master, self.optim),
        }


def timed_step(tr: Trainer) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    tr.forward_backward()
    tr.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_tool(tr: Trainer, tool: str, directory: str, saves: int, baseline_step: float) -> dict:
    """``saves`` consecutive saves, a training step after each; returns per-save numbers."""
    import torch.distributed.checkpoint as dcp

    records = []
    pending = None  # DCP async future / stashpoint handle of the previous save
    stager = None
    if tool == "dcp_async_pinned":
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False))
    for i in range(saves):
        path = os.path.join(directory, f"{tool}-{i}")
        tr.forward_backward()
        torch.cuda.synchronize()
        rec: dict = {"save": i}
        with RSSPeak() as rss:
            t0 = time.perf_counter()
            try:
                if tool == "torch_save":
                    os.makedirs(path, exist_ok=True)
                    f = os.path.join(path, "ckpt.pt")
                    torch.save(
                        {
                            "model": tr.model.state_dict(),
                            "master": tr.master.state_dict(),
                            "optim": tr.optim.state_dict(),
                        },
                        f,
                    )
                    fsync_tree(path)
                    t_ret = t_commit = time.perf_counter()
                elif tool == "dcp_save":
                    dcp.save(tr.dcp_state(), checkpoint_id=path)
                    fsync_tree(path)
                    t_ret = t_commit = time.perf_counter()
                elif tool in ("dcp_async", "dcp_async_pinned"):
                    if pending is not None:
                        pending.result()  # DCP: one save in flight at a time
                    kwargs = {"async_stager": stager} if stager is not None else {}
                    fut = dcp.async_save(tr.dcp_state(), checkpoint_id=path, **kwargs)
                    staging = getattr(fut, "staging_completion", None)
                    fut = getattr(fut, "upload_completion", fut)
                    if staging is not None:
                        staging.result()
                    t_ret = time.perf_counter()
                    pending = fut
                    fut.result()
                    fsync_tree(path)
                    t_commit = time.perf_counter()
                elif tool == "stashpoint_sync":
                    stashpoint.save(tr.stashpoint_state(), path)
                    t_ret = t_commit = time.perf_counter()
                else:  # stashpoint_eager / stashpoint_lazy / stashpoint_lazy_devbuf
                    mode = "eager" if tool == "stashpoint_eager" else "lazy"
                    handle = stashpoint.async_save(
                        tr.stashpoint_state(), path, mode=mode, device_buffer=tool.endswith("devbuf")
                    )
                    t_ret = time.perf_counter()
                    rec["pinned_bytes"] = handle.pinned_bytes
                    step_s = timed_step(tr)  # the next step overlaps the copy / waits for it
                    rec["next_step_s"] = step_s
                    rec["next_step_delay_s"] = max(0.0, step_s - baseline_step)
                    res = handle.wait()
                    t_commit = time.perf_counter()
                    rec["phase_seconds"] = res.phase_seconds
            except Exception as exc:  # a peer that crashes is a result too
                rec["error"] = f"{type(exc).__name__}: {exc}"
                records.append(rec)
                break
        rec["stall_s"] = (t_ret - t0) + rec.get("next_step_delay_s", 0.0)
        rec["return_s"] = t_ret - t0
        rec["commit_s"] = t_commit - t0
        rec["host_rss_peak_gib"] = rss.peak / GiB
        rec["bytes"] = dir_bytes(path)
        records.append(rec)
        if "next_step_s" not in rec:
            timed_step(tr)
        if i < saves - 1:  # keep the disk free; the last one is loaded below
            shutil.rmtree(path, ignore_errors=True)
    return {"saves": records, "last_path": os.path.join(directory, f"{tool}-{len(records) - 1}")}


def load_tool(tr: Trainer, tool: str, path: str) -> dict:
    import torch.distributed.checkpoint as dcp

    cold = drop_caches()
    torch.cuda.synchronize()
    t = time.perf_counter()
    if tool == "torch_save":
        sd = torch.load(os.path.join(path, "ckpt.pt"), map_location="cuda", weights_only=True)
        tr.model.load_state_dict(sd["model"])
        tr.master.load_state_dict(sd["master"])
        tr.optim.load_state_dict(sd["optim"])
        del sd
    elif tool.startswith("dcp"):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = tr.dcp_state()
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(tr.model, state["model"])
        set_model_state_dict(tr.master, state["master"])
        set_optimizer_state_dict(tr.master, tr.optim, state["optim"])
    else:
        stashpoint.load(tr.stashpoint_state(), path)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"load_s": seconds, "cold_cache": cold, "gbps": dir_bytes(path) / seconds / 1e9}


def part_single(args) -> dict:
    os.makedirs(args.dir, exist_ok=True)
    tr = Trainer(args.params)
    baseline = sorted(timed_step(tr) for _ in range(5))[2]
    out = {"params": tr.n_params, "state_bytes": tr.state_bytes, "baseline_step_s": baseline, "tools": {}}
    print(f"state {tr.state_bytes / GiB:.2f} GiB, step {baseline * 1e3:.1f} ms", flush=True)
    for tool in args.tools.split(","):
        t = time.perf_counter()
        if tool.startswith("stashpoint") and args.warmup:
            stashpoint.async_warmup(tr.stashpoint_state(), device_buffer=tool.endswith("devbuf"))
        res = run_tool(tr, tool, args.dir, args.saves, baseline)
        if not any("error" in r for r in res["saves"]):
            res["load"] = load_tool(tr, tool, res["last_path"])
        shutil.rmtree(res["last_path"], ignore_errors=True)
        out["tools"][tool] = res
        if args.out:  # partial results survive a run that is cut short
            with open(args.out + ".partial", "w") as f:
                json.dump(out, f, indent=1)
        stalls = [f"{r.get('stall_s', float('nan')):.3f}" for r in res["saves"]]
        print(f"{tool}: stalls {stalls} load {res.get('load')} ({time.perf_counter() - t:.0f}s)", flush=True)
        gc.collect()
    from stashpoint.engine.async_save import staging_pool

    out["pinned_bytes_final"] = staging_pool().pinned_bytes
    return out


# ----------------------------------------------------------------------------- end to end


def part_e2e(args) -> dict:
    from stashpoint.demo.model import GPTConfig, TinyGPT

    cfg = GPTConfig(vocab=32000, dim=2048, heads=16, layers=16, mlp=8192, seq=1024)
    torch.manual_seed(0)
    model = TinyGPT(cfg).cuda()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n_params = sum(p.numel() for p in model.parameters())
    batch = args.batch
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, cfg.vocab), tokens[:, 1:].reshape(-1)
            )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    state_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    write_gbps = args.write_gbps
    t = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / 10
    interval_s = 1.25 * state_bytes / (write_gbps * 1e9)
    every = max(1, round(interval_s / step_s))
    out = {
        "params": n_params,
        "state_bytes": state_bytes,
        "tokens_per_step": batch * cfg.seq,
        "step_s": step_s,
        "write_gbps": write_gbps,
        "interval_steps": every,
        "runs": {},
    }
    print(
        f"e2e: {n_params / 1e9:.2f}B params, {step_s * 1e3:.0f} ms/step, save every {every} steps", flush=True
    )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for tool in args.tools.split(","):
        os.makedirs(args.dir, exist_ok=True)
        pending = []
        saves = 0
        if tool.startswith("stashpoint"):  # once per job, like building the optimizer
            stashpoint.async_warmup({"model": model, "optim": optim}, device_buffer=tool == "stashpoint_lazy")
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(1, args.steps + 1):
            step()
            if tool != "none" and i % every == 0:
                path = os.path.join(args.dir, f"e2e-{tool}-{i}")
                saves += 1
                if tool == "stashpoint_lazy":
                    pending.append(
                        stashpoint.async_save(
                            {"model": model, "optim": optim}, path, mode="lazy", device_buffer=True
                        )
                    )
                elif tool == "stashpoint_eager":
                    pending.append(stashpoint.async_save({"model": model, "optim": optim}, path))
                elif tool == "dcp_save":
                    dcp.save(
                        {
                            "model": get_model_state_dict(model),
                            "optim": get_optimizer_state_dict(model, optim),
                        },
                        checkpoint_id=path,
                    )
                elif tool == "dcp_async":
                    for f in pending:
                        f.result()
                    pending = [
                        dcp.async_save(
                            {
                                "model": get_model_state_dict(model),
                                "optim": get_optimizer_state_dict(model, optim),
                            },
                            checkpoint_id=path,
                        )
                    ]
                # keep the disk free: older checkpoints of this run go
                old = os.path.join(args.dir, f"e2e-{tool}-{i - 2 * every}")
                threading.Thread(target=shutil.rmtree, args=(old, True), daemon=True).start()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        for p in pending:  # stashpoint handles have wait(), DCP futures result()
            (p.wait if hasattr(p, "wait_staged") else p.result)()
        out["runs"][tool] = {
            "steps": args.steps,
            "saves": saves,
            "seconds": seconds,
            "tokens_per_s": args.steps * batch * cfg.seq / seconds,
        }
        print(f"  {tool}: {out['runs'][tool]['tokens_per_s']:.0f} tokens/s, {saves} saves", flush=True)
        with open(args.out + ".partial", "w") as f:
            json.dump(out, f, indent=1)
        shutil.rmtree(args.dir, ignore_errors=True)
    base = out["runs"].get("none", {}).get("tokens_per_s")
    if base:
        for r in out["runs"].values():
            r["vs_no_checkpoint"] = r["tokens_per_s"] / base
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", required=True, choices=["limits", "single", "e2e"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", default="/tmp/stashpoint-bench")
    ap.add_argument("--params", type=float, default=1.3e9)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument(
        "--tools",
        default=None,
        help="comma-separated; single: stashpoint_sync,stashpoint_eager,stashpoint_lazy,"
        "stashpoint_lazy_devbuf,torch_save,dcp_save,dcp_async,dcp_async_pinned; "
        "e2e: none,stashpoint_lazy,stashpoint_eager,dcp_save,dcp_async",
    )
    ap.add_argument("--limits-json", help="take --write-gbps from this limits result")
    ap.add_argument("--warmup", action="store_true", help="single: call stashpoint.async_warmup first")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--write-gbps", type=float, default=2.5)
    ap.add_argument("--limits-gib", type=float, default=8.0)
    args = ap.parse_args()
    if args.tools is None:
        args.tools = (
            "none,stashpoint_lazy,stashpoint_eager,dcp_save,dcp_async"
            if args.part == "e2e"
            else "stashpoint_sync,stashpoint_eager,stashpoint_lazy,stashpoint_lazy_devbuf,"
            "torch_save,dcp_save,dcp_async,dcp_async_pinned"
        )
    if args.limits_json:
        with open(args.limits_json) as f:
            args.write_gbps = json.load(f)["limits"]["fsync_write_gbps"]
    os.makedirs(args.dir, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "stashpoint": stashpoint.__version__,
        "cpus": os.cpu_count(),
        "part": args.part,
        "argv": sys.argv[1:],
    }
    if args.part == "limits":
        doc["limits"] = measure_limits(args.dir, args.limits_gib)
    elif args.part == "single":
        doc["single"] = part_single(args)
    else:
        doc["e2e"] = part_e2e(args)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc.get("limits", {}), indent=1))


if __name__ == "__main__":
    main()
