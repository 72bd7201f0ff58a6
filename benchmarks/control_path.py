"""Control-path benchmark: the planning step of a save, with and without the plan cache.

What is measured:

* **Planning on one process** (``--entries``, default 784 and 3,136 state entries).  The
  state is synthetic: ``nn.Sequential`` of ``Linear(16, 16)`` layers and an ``AdamW`` after
  one step, so every parameter gives four entries (the parameter, ``step``,
  ``exp_avg``, ``exp_avg_sq``) plus one for ``param_groups`` and one for a ``step`` value:
  784 entries is 196 parameters, like the 0.94B GPT of docs/BENCHMARKS.md.  Variants:
  ``plain`` (no process group), ``fsdp2`` (every layer and the root under
  ``fully_shard`` on a one-rank gloo group, so parameters and moments are DTensors with
  FSDP2's state-dict hooks) and, when a GPU is present, ``cuda`` (``plain`` on the GPU)
  and ``cuda-fsdp2``.  For each, ``prepare_save`` (the collective planning step every save
  runs, nothing written) is timed ``--repeats`` times with the cache off (the process's
  cache set to capacity 0: every save plans in full) and with it on (the first save plans,
  the others reuse): the second number is what the training thread spends on planning
  per save from the second save on.
* **The control path at W ranks** (``--ranks``, default 8 16 32; gloo over localhost, one
  process per rank, each holding the same replicated model of ``--rank-entries`` entries).
  Per save: ``prepare_save`` alone, and a whole synchronous ``stashpoint.save`` into a
  temporary directory, cache off and on; each save is timed on every rank between
  barriers, and the slowest rank's time counts.  More ranks than cores share the CPUs,
  so these numbers include that contention (the machine is described in the output).

Output: a table on stdout and raw JSON (every timing) in
``benchmarks/results/control-path-<YYYY-MM-DD>.json``.

Run:  ``.venv/bin/python benchmarks/control_path.py [--entries 784 3136] [--ranks 8 16 32]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stashpoint
from stashpoint._dist import Coordinator
from stashpoint._state.flatten import flatten_state
from stashpoint.engine.plan_cache import DEFAULT_CAPACITY, default_plan_cache
from stashpoint.engine.prepare import prepare_save
from stashpoint.storage import resolve

HERE = os.path.dirname(os.path.abspath(__file__))


def build_state(entries: int, device: str = "cpu", fsdp2: bool = False) -> dict:
    """A model and a stepped AdamW with about ``entries`` state entries (4 per parameter)."""
    params = max(2, -(-(entries - 2) // 4))
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(params // 2)] + [nn.Linear(16, 16, bias=False)] * (params % 2)
    model = nn.Sequential(*layers).to(device)
    if fsdp2:
        mesh = init_device_mesh(device.split(":")[0], (1,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 16, device=device)).sum().backward()
    optim.step()
    optim.zero_grad()
    return {"model": model, "optim": optim, "step": 1}


def count_entries(state: dict) -> int:
    return len(flatten_state(state).leaves)


def time_prepare(state: dict, path: str, repeats: int, cached: bool) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU seconds per ``prepare_save`` call (cache on: the first call plans,
    then reuses).  CPU time is what a machine whose cores are not shared would show."""
    default_plan_cache().clear()
    default_plan_cache().capacity = DEFAULT_CAPACITY if cached else 0
    coord = Coordinator(None, 600)
    storage, final = resolve(path)
    wall, cpu = [], []
    for _ in range(repeats + (1 if cached else 0)):
        t0, c0 = time.perf_counter(), time.thread_time()
        prepared = prepare_save(state, coord, storage, final, None, True)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
        assert prepared.cached == (cached and len(wall) > 1)
    default_plan_cache().capacity = DEFAULT_CAPACITY
    return wall, cpu


def one_process(entries: list[int], repeats: int, tmp: str) -> list[dict]:
    variants = [("plain", "cpu", False)]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    rows = []
    for name, device, fsdp2 in variants:
        rows += _variant(name, device, fsdp2, entries, repeats, tmp)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    more = [("fsdp2", "cpu", True)]
    if torch.cuda.is_available():
        more += [("cuda", "cuda:0", False), ("cuda-fsdp2", "cuda:0", True)]
    for name, device, fsdp2 in more:
        rows += _variant(name, device, fsdp2, entries, repeats, tmp)
    dist.destroy_process_group()
    return rows


def _variant(name: str, device: str, fsdp2: bool, entries: list[int], repeats: int, tmp: str) -> list[dict]:
    rows = []
    for n in entries:
        state = build_state(n, device, fsdp2)
        path = os.path.join(tmp, f"one-{name}-{n}")
        row = {"variant": name, "entries": count_entries(state)}
        row["uncached_s"], row["uncached_cpu_s"] = time_prepare(state, path, repeats, cached=False)
        row["cached_s"], row["cached_cpu_s"] = time_prepare(state, path, repeats, cached=True)
        rows.append(row)
        print(_row_text(row), flush=True)
    return rows


def _row_text(row: dict) -> str:
    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:8.2f} (min {min(xs) * 1e3:7.2f})"

    return (
        f"{row['variant']:>10} {row['entries']:>5} entries, ms wall/cpu: plan {ms(row['uncached_s'])}"
        f" / {ms(row['uncached_cpu_s'])}; cached {ms(row['cached_s'][1:])} / {ms(row['cached_cpu_s'][1:])};"
        f" first {row['cached_s'][0] * 1e3:.1f}"
    )


def _rank_main(rank: int, world: int, init: str, entries: int, repeats: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    state = build_state(entries)
    coord = Coordinator(None, 600)
    result = {}
    for cached in (False, True):
        default_plan_cache().clear()
        default_plan_cache().capacity = DEFAULT_CAPACITY if cached else 0
        storage, final = resolve(os.path.join(tmp, f"w{world}-prep"))
        prep, save, phases = [], [], []
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            prepare_save(state, coord, storage, final, None, True)
            prep.append(time.perf_counter() - t0)
        for i in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            r = stashpoint.save(state, os.path.join(tmp, f"w{world}-{cached}-{i}"), timeout_s=600)
            save.append(time.perf_counter() - t0)
            phases.append(r.phase_seconds)
        result["cached" if cached else "uncached"] = {"prepare_s": prep, "save_s": save, "phases": phases}
    with open(os.path.join(tmp, f"rank-{world}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def many_ranks(worlds: list[int], entries: int, repeats: int, tmp: str) -> list[dict]:
    rows = []
    for world in worlds:
        init = os.path.join(tmp, f"rdzv-{world}")
        t0 = time.perf_counter()
        mp.start_processes(
            _rank_main, args=(world, init, entries, repeats, tmp), nprocs=world, start_method="spawn"
        )
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank-{world}-{r}.json")) as f:
                per_rank.append(json.load(f))
        row = {"ranks": world, "entries": entries, "wall_s": time.perf_counter() - t0}
        for mode in ("uncached", "cached"):
            for what in ("prepare_s", "save_s"):
                # slowest rank per save; the first save of the cached run plans in full
                slowest = [max(pr[mode][what][i] for pr in per_rank) for i in range(repeats + 1)]
                row[f"{mode}_{what}"] = slowest
            row[f"{mode}_phases_rank0"] = per_rank[0][mode]["phases"]
        rows.append(row)
        med = {k: statistics.median(row[k][1:]) * 1e3 for k in row if k.endswith("_s") and k != "wall_s"}
        print(
            f"{world:>3} ranks: prepare {med['uncached_prepare_s']:8.2f} -> {med['cached_prepare_s']:7.2f}ms,"
            f" whole save {med['uncached_save_s']:8.2f} -> {med['cached_save_s']:8.2f} ms"
            f" (slowest rank, median of {repeats})",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, nargs="*", default=[784, 3136])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--rank-entries", type=int, default=784)
    ap.add_argument("--rank-repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--dir", default=None, help="where the temporary checkpoints go")
    args = ap.parse_args()
    out = args.out or os.path.join(HERE, "results", f"control-path-{datetime.date.today().isoformat()}.json")
    record = {"benchmark": "control_path", "args": vars(args), "one_process": [], "ranks": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.entries:
            record["one_process"] = one_process(args.entries, args.repeats, tmp)
            write(out, record)
        for world in args.ranks:  # written after each size: a long run keeps what it measured
            record["ranks"] += many_ranks([world], args.rank_entries, args.rank_repeats, tmp)
            write(out, record)
    print(f"wrote {out}")


def write(out: str, record: dict) -> None:
    record["machine"] = {
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    record["stashpoint_source"] = os.path.dirname(stashpoint.__file__)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
