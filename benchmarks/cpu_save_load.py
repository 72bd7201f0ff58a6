"""CPU save/load benchmark: torch.save/torch.load vs PyTorch DCP vs stashpoint, on one state.

What is measured, in one run and on the same in-memory state:

* **State.**  A dict ``{"model": nn.Sequential of Linear layers, "optim": Adam}`` on the CPU.
  Most layers are fp32, some bf16; the optimizer has taken one step, so ``exp_avg`` /
  ``exp_avg_sq`` / ``step`` exist.  ``--gib`` sets the total tensor bytes (parameters plus
  optimizer state, default 1 GiB).  Throughput is always *logical state bytes / seconds*
  (GB = 1e9 bytes), so every tool is divided by the same number.
* **Machine limits.**  Sequential write of the same number of raw bytes with ``os.write`` of a
  64 MiB buffer followed by one ``fsync`` (the pattern all three tools follow), the same with
  writeback started after every block (``sync_file_range``, "streamed": what a writer that
  overlaps copying and disk I/O could reach), and a sequential read of that file.
* **Cache.**  Before every timed operation (raw or tool, save or load) we ``sync``, write
  ``3`` to ``/proc/sys/vm/drop_caches`` and pause ``--settle`` seconds, so every load is a
  cold read and no save inherits dirty pages.  If dropping is not permitted, the results
  say ``"warm cache"`` and loads read from RAM.
* **Tools.**  For each repeat (``--repeats``, default 3, median reported; the tool order
  rotates between repeats) and for each tool a fresh output path is used:

  - ``torch.save``: ``{"model": model.state_dict(), "optim": optim.state_dict()}`` into an
    open file, then ``flush`` + ``fsync`` of the file and of its directory (stashpoint and
    DCP both fsync, so this keeps the comparison fair).  ``torch.load`` (``weights_only``)
    plus ``load_state_dict`` into a fresh model and optimizer of the same shapes.
  - DCP: ``get_state_dict`` + ``torch.distributed.checkpoint.save`` (default
    ``FileSystemWriter``: one file, one thread, fsync on), single process, no process
    group.  Load: ``get_state_dict`` on the fresh target, ``dcp.load``, ``set_state_dict``.
  - stashpoint: ``stashpoint.save({"model": m, "optim": o}, path)``; ``stashpoint.load``
    into the fresh target; and ``stashpoint.load_full`` (flat dict of CPU tensors) of the
    same checkpoint, reported as its own row.

  The fresh target is built with another seed (and one Adam step, so its optimizer state
  exists and differs from the source) outside the timed region.  After every load the
  result is compared with the source bit for bit (dtype, shape, raw bytes; optimizer
  ``param_groups`` too) and the run aborts on any difference, so all numbers are of
  correct loads.

Output: a table of medians (and the min-max spread) on stdout and raw JSON (every timing,
stashpoint's per-phase seconds, limits, sizes, machine description without hostname, which
stashpoint source was imported) in ``benchmarks/results/cpu-<YYYY-MM-DD>.json``.

Run:  ``.venv/bin/python benchmarks/cpu_save_load.py [--gib 1] [--repeats 3] [--dir /tmp/...]``
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import stashpoint

GB = 1e9
GIB = 1 << 30
TOOLS = ("torch.save", "dcp", "stashpoint")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- state


# 8 square Linear layers; layers 1 and 5 in bf16, the rest fp32
LAYER_DTYPES = [torch.bfloat16 if i in (1, 5) else torch.float32 for i in range(8)]


def layer_plan(gib: float, dtypes: list[torch.dtype] = LAYER_DTYPES) -> tuple[int, list[torch.dtype]]:
    """Square Linear width ``d`` (multiple of 64) so that params + Adam state ~= ``gib`` GiB."""
    per_d2 = sum(3 * (4 if dt == torch.float32 else 2) for dt in dtypes)  # param + exp_avg + exp_avg_sq
    d = int(math.sqrt(gib * GIB / per_d2))
    d = max(64, d // 64 * 64)
    return d, dtypes


def build_state(d: int, dtypes: list[torch.dtype], seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Linear layers of width ``d`` plus an Adam optimizer after one step (random grads)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for dt in dtypes:
        lin = nn.Linear(d, d, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d, d, generator=g))
            lin.bias.copy_(torch.randn(d, generator=g))
        layers.append(lin)
    model = nn.Sequential(*layers)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def state_bytes(model: nn.Module, optim: torch.optim.Optimizer) -> int:
    return tensor_bytes(model.state_dict()) + tensor_bytes(optim.state_dict())


# --------------------------------------------------------------------------- verification


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensor(name: str, got, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor), f"{name}: got {type(got).__name__}, not a tensor"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(_bits(got), _bits(want)), f"{name}: bytes differ"


def assert_same_tree(name: str, got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert_same_tensor(name, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{name}: got {type(got).__name__}, not a dict"
        assert set(got) == set(want), f"{name}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_tree(f"{name}.{k}", got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{name}: length differs"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_tree(f"{name}.{i}", a, b)
    else:
        assert got == want, f"{name}: {got!r} != {want!r}"


def assert_same_state(model, optim, ref_model, ref_optim) -> None:
    """Model and optimizer equal the reference bit for bit (optimizer state keyed by parameter FQN)."""
    assert_same_tree("model", model.state_dict(), ref_model.state_dict())
    got_m, got_o = get_state_dict(model, optim)
    want_m, want_o = get_state_dict(ref_model, ref_optim)
    assert_same_tree("model(dcp view)", got_m, want_m)
    assert_same_tree("optim", got_o, want_o)


def flatten(obj, prefix: str, out: dict) -> dict:
    """Dotted names for every tensor in nested dicts/lists (stashpoint's naming of FQNs)."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}", out)
    return out


def assert_same_flat(full: dict, ref_model, ref_optim) -> None:
    want_m, want_o = get_state_dict(ref_model, ref_optim)
    want = flatten(want_o, "optim", flatten(want_m, "model", {}))
    for name, t in want.items():
        assert name in full, f"load_full: {name!r} missing (have e.g. {sorted(full)[:5]})"
        assert_same_tensor(f"load_full[{name}]", full[name], t)
    extra = {k for k, v in full.items() if isinstance(v, torch.Tensor)} - set(want)
    assert not extra, f"load_full: unexpected tensors {sorted(extra)[:5]}"


# --------------------------------------------------------------------------- cache / fs helpers


def drop_caches() -> bool:
    """``sync`` then drop the page cache; False if not permitted (the load then reads warm cache)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def settle(seconds: float) -> bool:
    """Quiesce before a timed operation: flush dirty data, drop the page cache, wait.

    Every timed save and load starts from the same state (no dirty pages or pending
    discards from the previous step, nothing of the checkpoint cached).  Returns whether
    the cache could be dropped.
    """
    dropped = drop_caches()
    if seconds > 0:
        time.sleep(seconds)
    return dropped


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def disk_usage(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- machine limits


def _sync_file_range():
    """libc ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` (Linux), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, n: int) -> None:
        if fn(fd, offset, n, 2) != 0:  # 2 = SYNC_FILE_RANGE_WRITE: start writeback, do not wait
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return start_writeback


def raw_write(path: str, nbytes: int, buf: memoryview, start_writeback=None) -> float:
    """Seconds to write ``nbytes`` from ``buf`` (repeated) and fsync; optionally start writeback per block."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            view = buf[: min(len(buf), nbytes - done)]
            start = done
            while view:
                n = os.write(fd, view)
                view = view[n:]
                done += n
            if start_writeback is not None:
                start_writeback(fd, start, done - start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def raw_read(path: str, block: int) -> tuple[float, int]:
    rbuf = bytearray(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while True:
            n = os.readv(fd, [rbuf])
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    return time.perf_counter() - t0, got


def measure_limits(workdir: str, nbytes: int, repeats: int, settle_s: float) -> dict:
    """Raw sequential write throughput and (cold where possible) read throughput of ``nbytes``.

    ``write_fsync``: 64 MiB ``os.write`` calls into the page cache, then one ``fsync`` (the
    pattern of all three tools).  ``write_streamed``: the same, but writeback of each block is
    started right after it is written (``sync_file_range``), so the disk works while the
    page cache is filled; an upper bound for a writer that overlaps the two.
    """
    block = 64 << 20
    buf = memoryview(bytearray(os.urandom(1 << 20)) * (block >> 20))
    start_writeback = _sync_file_range()
    writes, streamed, reads, cold = [], [], [], []
    path = os.path.join(workdir, "raw.bin")
    for i in range(repeats):
        variants = [("plain", None), ("streamed", start_writeback)]
        if i % 2:
            variants.reverse()
        for name, wb in variants:
            if name == "streamed" and wb is None:
                continue
            remove(path)
            settle(settle_s)
            (writes if name == "plain" else streamed).append(raw_write(path, nbytes, buf, wb))
        cold.append(settle(settle_s))
        t, got = raw_read(path, block)
        reads.append(t)
        assert got == nbytes, f"raw read got {got} of {nbytes} bytes"
    remove(path)
    return {
        "bytes": nbytes,
        "write_fsync_s": writes,
        "write_streamed_s": streamed,
        "read_s": reads,
        "write_fsync_GBps": nbytes / statistics.median(writes) / GB,
        "write_streamed_GBps": nbytes / statistics.median(streamed) / GB if streamed else None,
        "read_GBps": nbytes / statistics.median(reads) / GB,
        "read_cache": "dropped" if all(cold) else "warm cache",
    }


# --------------------------------------------------------------------------- tools


def torch_save(model, optim, path: str) -> None:
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def torch_load(model, optim, path: str) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd["model"])
    optim.load_state_dict(sd["optim"])


def dcp_save(model, optim, path: str) -> None:
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def dcp_load(model, optim, path: str) -> None:
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def sp_save(model, optim, path: str):
    return stashpoint.save({"model": model, "optim": optim}, path)


def sp_load(model, optim, path: str):
    return stashpoint.load({"model": model, "optim": optim}, path)


SAVE = {"torch.save": torch_save, "dcp": dcp_save, "stashpoint": sp_save}
LOAD = {"torch.save": torch_load, "dcp": dcp_load, "stashpoint": sp_load}
EXT = {"torch.save": ".pt", "dcp": ".dcp", "stashpoint": ".stash"}


# --------------------------------------------------------------------------- machine description


def machine() -> dict:
    desc: dict = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        desc["memory_gib"] = round(kib / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        desc["memory_gib"] = None
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("model name"))
        desc["cpu_model"] = line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        desc["cpu_model"] = None
    return desc


def source_info() -> dict:
    """Which stashpoint code ran: import location, content hash, git commit and dirty flag if any."""
    pkg = Path(stashpoint.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    info: dict = {"package_dir": str(pkg), "sha256": h.hexdigest(), "git_commit": None, "git_dirty": None}

    def git(*cmd: str) -> str:
        # read-only queries; --no-optional-locks keeps `status` from rewriting the index
        run = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(pkg), *cmd],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return run.stdout.strip()

    try:
        info["git_commit"] = git("rev-parse", "HEAD")
        info["git_dirty"] = git("status", "--porcelain", "--", ".") != ""
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def filesystem(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, fstype = "", None
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return None
    return fstype


# --------------------------------------------------------------------------- main


def fmt(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="total tensor bytes of the state, GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per tool; the median is reported")
    ap.add_argument("--dir", default=None, help="output directory (default: a new one under /tmp)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds to wait after sync + drop_caches before each timing",
    )
    ap.add_argument("--skip-limits", action="store_true", help="do not measure raw disk throughput")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. which build was measured)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-<date>.json)")
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown or not tools:
        ap.error(f"--tools must name some of {', '.join(TOOLS)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    # DCP warns that it assumes a single process when no process group exists: that is intended here
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninit.*")
    warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")

    made_dir = args.dir is None
    workdir = tempfile.mkdtemp(prefix="stashpoint-bench-", dir="/tmp") if made_dir else args.dir
    os.makedirs(workdir, exist_ok=True)
    try:
        return run(args, tools, workdir)
    finally:
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, tools: list[str], workdir: str) -> int:
    """Build the state, measure limits and every tool, print the table, write the JSON."""
    source = source_info()
    d, dtypes = layer_plan(args.gib)
    print(
        f"building state: {len(dtypes)} Linear({d}, {d}) layers "
        f"({sum(dt == torch.bfloat16 for dt in dtypes)} bf16) + Adam after one step ...",
        flush=True,
    )
    ref_model, ref_optim = build_state(d, dtypes, seed=0)
    nbytes = state_bytes(ref_model, ref_optim)
    print(
        f"state: {nbytes / GIB:.3f} GiB of tensors; output dir {workdir} ({filesystem(workdir)})", flush=True
    )

    limits = None
    if not args.skip_limits:
        print("measuring raw write+fsync / read throughput ...", flush=True)
        limits = measure_limits(workdir, nbytes, args.repeats, args.settle)
        print(
            f"  write+fsync {limits['write_fsync_GBps']:.2f} GB/s, streamed write+fsync "
            f"{fmt(limits['write_streamed_GBps'])} GB/s, "
            f"read {limits['read_GBps']:.2f} GB/s ({limits['read_cache']})",
            flush=True,
        )

    raw: dict[str, dict[str, list]] = {t: {"save_s": [], "load_s": [], "disk_bytes": []} for t in tools}
    if "stashpoint" in tools:
        raw["stashpoint.load_full"] = {"load_s": []}
        raw["stashpoint"].update(save_phases=[], load_phases=[])
    cache_dropped: list[bool] = []
    orders: list[list[str]] = []

    for rep in range(args.repeats):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]  # rotate: no tool always goes first
        orders.append(order)
        for tool in order:
            path = os.path.join(workdir, f"{tool.replace('.', '_')}-r{rep}{EXT[tool]}")
            remove(path)
            gc.collect()
            settle(args.settle)
            t_save, res = timed(lambda tool=tool, path=path: SAVE[tool](ref_model, ref_optim, path))
            raw[tool]["save_s"].append(t_save)
            raw[tool]["disk_bytes"].append(disk_usage(path))
            if tool == "stashpoint":
                raw[tool]["save_phases"].append(res.phase_seconds)

            model, optim = build_state(d, dtypes, seed=1000 + rep)
            gc.collect()
            cache_dropped.append(settle(args.settle))
            t_load, res = timed(lambda tool=tool, path=path, m=model, o=optim: LOAD[tool](m, o, path))
            raw[tool]["load_s"].append(t_load)
            if tool == "stashpoint":
                raw[tool]["load_phases"].append(res.phase_seconds)
            assert_same_state(model, optim, ref_model, ref_optim)
            del model, optim, res
            msg = f"  repeat {rep + 1}/{args.repeats} {tool:<11} save {t_save:7.2f} s  load {t_load:7.2f} s"

            if tool == "stashpoint":
                gc.collect()
                cache_dropped.append(settle(args.settle))
                t_full, full = timed(lambda path=path: stashpoint.load_full(path))
                raw["stashpoint.load_full"]["load_s"].append(t_full)
                assert_same_flat(full, ref_model, ref_optim)
                del full
                msg += f"  load_full {t_full:7.2f} s"
            remove(path)
            print(msg, flush=True)

    source["changed_during_run"] = source_info()["sha256"] != source["sha256"]
    if source["changed_during_run"]:
        print("WARNING: the stashpoint source changed during the run; numbers may mix two versions")

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    summary = {}
    for tool, r in raw.items():
        s, ld = med(r.get("save_s", [])), med(r["load_s"])
        summary[tool] = {
            "save_s": s,
            "save_GBps": nbytes / s / GB if s else None,
            "load_s": ld,
            "load_GBps": nbytes / ld / GB if ld else None,
            "save_min_max_s": [min(r["save_s"]), max(r["save_s"])] if r.get("save_s") else None,
            "load_min_max_s": [min(r["load_s"]), max(r["load_s"])],
        }
    base = summary.get("dcp")
    for row in summary.values():
        row["save_vs_dcp"] = base["save_s"] / row["save_s"] if base and row["save_s"] else None
        row["load_vs_dcp"] = base["load_s"] / row["load_s"] if base and row["load_s"] else None

    cache = "dropped" if all(cache_dropped) else "warm cache"
    cols = ("save s", "save GB/s", "load s", "load GB/s", "save/DCP", "load/DCP")
    hdr = f"{'tool':<22}" + "".join(f"{c:>11}" for c in cols)
    print()
    print(f"state {nbytes / GIB:.3f} GiB, median of {args.repeats}, page cache before loads: {cache}")
    print("ratio = DCP time / tool time (>1: faster than DCP)")
    print(hdr)
    print("-" * len(hdr))
    for tool, row in summary.items():
        cells = [
            fmt(row["save_s"]),
            fmt(row["save_GBps"]),
            fmt(row["load_s"]),
            fmt(row["load_GBps"]),
            fmt(row["save_vs_dcp"], "x"),
            fmt(row["load_vs_dcp"], "x"),
        ]
        print(f"{tool:<22}" + "".join(f"{c:>11}" for c in cells))
    if limits:
        w, r = limits["write_fsync_GBps"], limits["read_GBps"]
        cells = [fmt(nbytes / GB / w), fmt(w), fmt(nbytes / GB / r), fmt(r)]
        line = f"{'disk limit (raw)':<22}" + "".join(f"{c:>11}" for c in cells)
        print(f"{line}   (write then fsync; read: {limits['read_cache']})")
        if limits["write_streamed_GBps"]:
            w = limits["write_streamed_GBps"]
            line = f"{'disk limit (streamed)':<22}" + "".join(
                f"{c:>11}" for c in [fmt(nbytes / GB / w), fmt(w)]
            )
            print(f"{line}   (writeback started per 64 MiB block)")
    print()
    print("spread over repeats (min - max seconds):")
    for tool, row in summary.items():
        sv, lv = row["save_min_max_s"], row["load_min_max_s"]
        save = f"save {sv[0]:.2f} - {sv[1]:.2f}" if sv else " " * 16
        print(f"  {tool:<22} {save}   load {lv[0]:.2f} - {lv[1]:.2f}")

    today = datetime.date.today().isoformat()
    result = {
        "benchmark": "cpu_save_load",
        "date": today,
        "machine": machine(),
        "filesystem": filesystem(workdir),
        "torch_version": torch.__version__,
        "stashpoint_version": stashpoint.__version__,
        "stashpoint_source": source,
        "note": args.note,
        "python_argv": sys.argv[1:],
        "state": {
            "gib_requested": args.gib,
            "bytes": nbytes,
            "linear_width": d,
            "layer_dtypes": [str(dt) for dt in dtypes],
            "optimizer": "Adam (one step)",
        },
        "repeats": args.repeats,
        "settle_s": args.settle,
        "tool_order_per_repeat": orders,
        "page_cache_before_loads": cache,
        "limits": limits,
        "raw": raw,
        "median": summary,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"cpu-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
