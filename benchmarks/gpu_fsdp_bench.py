"""FSDP2 checkpoint benchmark on several GPUs: stashpoint against DCP, same-layout and resharded loads.

One process per GPU (NCCL for the model, gloo for stashpoint's control traffic).  A GPT
of ``--params`` parameters (fp32 weights + AdamW moments) is sharded with FSDP2 over
``--gpus`` ranks; for each tool, ``--saves`` consecutive saves with a training step
between them, each rank timing its stall and time to durable commit.  Then the last
checkpoint of each tool is loaded at the same world size, and ``--part load`` run with
another ``--gpus`` loads it resharded.  Results of rank 0 (with every rank's timings)
go to ``--out`` as JSON.

    python benchmarks/gpu_fsdp_bench.py --gpus 4 --params 3e9 --out fsdp4.json
    python benchmarks/gpu_fsdp_bench.py --part load --gpus 2 --dir /tmp/sp-fsdp --out load2.json

On a machine without GPUs it runs on CPU with gloo (``--params 2e6``), which is how
its logic is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _config(params: float):
    from stashpoint.demo.model import GPTConfig

    # width w, 4w^2 + 8w^2 per layer, layers ~ w / 118 (GPT-like aspect ratio)
    w = 256
    while True:
        layers = max(2, w // 118)
        if layers * 12 * w * w + 2 * 32000 * w >= params:
            break
        w += 256
    return GPTConfig(vocab=32000, dim=w, heads=max(1, w // 128), layers=layers, mlp=4 * w, seq=1024)


def _build(params: float, device: torch.device, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from stashpoint.demo.model import TinyGPT, shard_fsdp

    cfg = _config(params)
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyGPT(cfg)
    mesh = init_device_mesh(device.type, (world,))
    shard_fsdp(model, mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return cfg, model, optim


def _step(cfg, model, optim, device, batch: int = 1, seq: int = 256) -> None:
    tokens = torch.randint(0, cfg.vocab, (batch, seq + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _save_rounds(rank, world, args, device, cfg, model, optim) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import stashpoint

    ctrl = dist.new_group(backend="gloo")
    out = {}
    for tool in args.tools.split(","):
        if tool.startswith("stashpoint_") and tool != "stashpoint_sync":
            stashpoint.async_warmup({"model": model, "optim": optim}, device_buffer=device.type == "cuda")
        saves, pending = [], None
        n_saves = args.saves if tool.startswith("stashpoint") else (args.peer_saves or args.saves)
        for i in range(n_saves):
            path = os.path.join(args.dir, f"{tool}-{i}")
            _step(cfg, model, optim, device)
            _sync(device)
            dist.barrier(ctrl)
            t0 = time.perf_counter()
            rec = {"save": i}
            if tool == "stashpoint_sync":
                stashpoint.save({"model": model, "optim": optim}, path)
                t_ret = t_commit = time.perf_counter()
            elif tool.startswith("stashpoint"):
                handle = stashpoint.async_save(
                    {"model": model, "optim": optim},
                    path,
                    mode="lazy" if tool == "stashpoint_lazy" else "eager",
                    device_buffer=device.type == "cuda" and tool == "stashpoint_lazy",
                )
                t_ret = time.perf_counter()
                _step(cfg, model, optim, device)
                _sync(device)
                rec["next_step_s"] = time.perf_counter() - t_ret
                handle.wait()
                t_commit = time.perf_counter()
                rec["pinned_bytes"] = handle.pinned_bytes
            else:
                state = {
                    "model": get_model_state_dict(model),
                    "optim": get_optimizer_state_dict(model, optim),
                }
                if tool == "dcp_save":
                    dcp.save(state, checkpoint_id=path)
                    t_ret = t_commit = time.perf_counter()
                else:
                    if pending is not None:
                        pending.result()
                    pending = dcp.async_save(state, checkpoint_id=path)
                    t_ret = time.perf_counter()
                    pending.result()
                    t_commit = time.perf_counter()
            rec["stall_s"] = t_ret - t0
            rec["commit_s"] = t_commit - t0
            saves.append(rec)
            dist.barrier(ctrl)
            if rank == 0 and i < n_saves - 1:
                shutil.rmtree(path, ignore_errors=True)
        out[tool] = {
            "saves": saves,
            "path": os.path.join(args.dir, f"{tool}-{n_saves - 1}"),
            # cumulative peak RSS of this rank's training process after this tool's saves
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if rank == 0:
            _write_partial(args.out, "saves", out)
    return out


def _fsync_write_gbps(directory: str, gib: float = 4.0) -> float:
    """The disk's fsync'd sequential write speed, as the single-GPU benchmark measures it."""
    from gpu_bench import fsync_write_gbps  # benchmarks/ is on sys.path when run as a script

    path = os.path.join(directory, "limits.bin")
    speed = fsync_write_gbps(path, int(gib * (1 << 30)), memoryview(bytearray(64 << 20)))
    os.unlink(path)
    return speed


def _e2e(rank, world, args, device, cfg, model, optim) -> dict:
    """Training throughput without checkpoints and with one every disk-sustainable interval."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import stashpoint

    ctrl = dist.new_group(backend="gloo")
    dcp_group = dist.new_group(backend="gloo")
    local = sum(t.numel() * t.element_size() for t in _local_tensors(model, optim))
    sizes = [0] * world
    dist.all_gather_object(sizes, local, group=ctrl)
    state_bytes = sum(sizes)
    speed = [_fsync_write_gbps(args.dir) if rank == 0 else 0.0]
    dist.broadcast_object_list(speed, src=0, group=ctrl)
    interval_s = 1.25 * state_bytes / (speed[0] * 1e9)

    def step() -> None:
        _step(cfg, model, optim, device, batch=args.batch, seq=args.seq)

    for _ in range(3):
        step()
    _sync(device)
    dist.barrier(ctrl)
    t = time.perf_counter()
    for _ in range(10):
        step()
    _sync(device)
    step_s = [time.perf_counter() - t]
    dist.broadcast_object_list(step_s, src=0, group=ctrl)
    step_s = step_s[0] / 10
    every = max(1, round(interval_s / step_s))
    n_steps = max(2 * every + every // 2, int(args.run_s / step_s))
    stashpoint.async_warmup({"model": model, "optim": optim}, device_buffer=device.type == "cuda")
    out = {
        "state_bytes": state_bytes,
        "write_gbps": speed[0],
        "interval_s": interval_s,
        "step_s": step_s,
        "save_every_steps": every,
        "steps": n_steps,
        "tokens_per_step": args.batch * args.seq * world,
        "runs": {},
    }
    for tool in ("none", "stashpoint_lazy", "dcp_async"):
        pending, handle, saves = None, None, 0
        _sync(device)
        dist.barrier(ctrl)
        t = time.perf_counter()
        for i in range(n_steps):
            step()
            if tool != "none" and i % every == every - 1:
                path = os.path.join(args.dir, f"e2e-{tool}-{saves}")
                saves += 1
                if tool == "stashpoint_lazy":
                    handle = stashpoint.async_save(
                        {"model": model, "optim": optim},
                        path,
                        mode="lazy",
                        device_buffer=device.type == "cuda",
                    )
                else:
                    if pending is not None:
                        pending.result()
                    state = {
                        "model": get_model_state_dict(model),
                        "optim": get_optimizer_state_dict(model, optim),
                    }
                    # its own gloo group: DCP plans in a background thread, concurrently with FSDP
                    pending = dcp.async_save(state, checkpoint_id=path, process_group=dcp_group)
        _sync(device)
        elapsed = time.perf_counter() - t
        if handle is not None:
            handle.wait()
        if pending is not None:
            pending.result()
        dist.barrier(ctrl)
        out["runs"][tool] = {
            "seconds": elapsed,
            "saves": saves,
            "tokens_per_s": n_steps * out["tokens_per_step"] / elapsed,
        }
        if rank == 0:
            for name in os.listdir(args.dir):
                if name.startswith("e2e-"):
                    shutil.rmtree(os.path.join(args.dir, name), ignore_errors=True)
            _write_partial(args.out, "e2e", out)
    base = out["runs"]["none"]["tokens_per_s"]
    for rec in out["runs"].values():
        rec["vs_none"] = rec["tokens_per_s"] / base
    return out


def _local_tensors(model, optim):
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        yield p.to_local() if isinstance(p, DTensor) else p
    for st in optim.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                yield v.to_local() if isinstance(v, DTensor) else v


def _write_partial(out_path: str, part: str, data: dict) -> None:
    """Rank 0's results so far, so a run cut short still leaves numbers behind."""
    with open(f"{out_path}.{part}.partial", "w") as f:
        json.dump(data, f, indent=1)


def _load_all(rank, world, args, device, cfg, model, optim, paths: dict) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import stashpoint

    ctrl = dist.new_group(backend="gloo")
    out = {}
    for tool, path in paths.items():
        if rank == 0:
            _drop_caches()
        dist.barrier(ctrl)
        _sync(device)
        t = time.perf_counter()
        rec = {}
        if tool.startswith("stashpoint"):
            res = stashpoint.load({"model": model, "optim": optim}, path)
            rec["bytes_read"] = res.bytes_read
        else:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optim, state["optim"])
        _sync(device)
        rec["load_s"] = time.perf_counter() - t
        dist.barrier(ctrl)
        out[tool] = rec
        if rank == 0:
            _write_partial(args.out, f"load-{world}", out)
    return out


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _worker(rank: int, world: int, args, init_file: str, results) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    # DCP's async_save needs a CPU backend next to NCCL
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
    )
    try:
        cfg, model, optim = _build(args.params, device, world)
        _step(cfg, model, optim, device)
        out = {"params": sum(p.numel() for p in model.parameters())}
        if args.part == "e2e":
            out["e2e"] = _e2e(rank, world, args, device, cfg, model, optim)
        elif args.part == "save":
            saved = _save_rounds(rank, world, args, device, cfg, model, optim)
            out["saves"] = {k: v["saves"] for k, v in saved.items()}
            out["rss_peak_bytes"] = {k: v["rss_peak_bytes"] for k, v in saved.items()}
            out["load_same_world"] = _load_all(
                rank, world, args, device, cfg, model, optim, {k: v["path"] for k, v in saved.items()}
            )
        else:
            paths = {
                name.rsplit("-", 1)[0]: os.path.join(args.dir, name)
                for name in sorted(os.listdir(args.dir))
                if not name.startswith(".")
            }
            out["load_resharded"] = _load_all(rank, world, args, device, cfg, model, optim, paths)
        gathered = [None] * world
        dist.all_gather_object(gathered, out, group=dist.new_group(backend="gloo"))
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["save", "load", "e2e"], default="save")
    ap.add_argument("--batch", type=int, default=8, help="e2e: sequences per rank and step")
    ap.add_argument("--seq", type=int, default=1024, help="e2e: tokens per sequence")
    ap.add_argument("--run-s", type=float, default=30.0, help="e2e: seconds per run (at least 2.5 saves)")
    ap.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--params", type=float, default=3e9)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--peer-saves", type=int, default=0, help="saves per peer tool (default: --saves)")
    ap.add_argument("--tools", default="stashpoint_lazy,stashpoint_sync,dcp_async,dcp_save")
    ap.add_argument("--dir", default="/tmp/sp-fsdp")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = tempfile.mktemp(prefix="sp-fsdp-")
    procs = [
        ctx.Process(target=_worker, args=(r, args.gpus, args, init_file, results)) for r in range(args.gpus)
    ]
    for p in procs:
        p.start()
    gathered = results.get()
    for p in procs:
        p.join()
    import stashpoint

    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "world_size": args.gpus,
        "torch": torch.__version__,
        "stashpoint": stashpoint.__version__,
        "part": args.part,
        "params": gathered[0]["params"],
        "ranks": gathered,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    r0 = gathered[0]
    for key in ("saves", "load_same_world", "load_resharded", "e2e"):
        if key in r0:
            print(key, json.dumps(r0[key])[:2000])


if __name__ == "__main__":
    main()
