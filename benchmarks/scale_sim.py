"""Simulated-scale planning benchmark: a 70B-class state at 8 to 8,192 ranks, on one CPU.

No processes, no data: stashpoint's own planning and index code runs on the inventory of
every rank (``scale_model.py``: 80 layers, hidden 8192, vocabulary 128256, parameters
plus two Adam moments plus ``step``, float32; FSDP over N ranks and FSDP x TP(8)).  Per
layout and N, per rank:

* **save plan**: ``build_save_plan`` over all N inventories, time and peak Python memory
  (``tracemalloc``), up to ``--plan-max`` ranks (beyond, the inventories exceed this
  machine's memory).
* **index build**: ``plan_grids``, the rank's own fragment, and ``build_index`` on the
  coordinator.  Beyond ``--plan-max`` the grids come from the layout rule
  (``scale_model.rule_grid``), checked equal to the inferred ones where both exist.
* **index size on disk**: ``index.json`` plus every rank's fragment (byte ranges and
  checksums are placeholders of realistic width), and up to ``--plan-max`` the same index
  in format 2's explicit form.
* **load**: on the middle rank of a load at N/2, N and 2N ranks of the same layout kind:
  parse ``index.json``, then ``plan_load``, which reads only the fragments its boxes
  overlap.  Median, fastest and CPU time of ``--repeats``; peak memory in one more run.

Writes ``benchmarks/results/scale-sim-<date>.json`` and ``docs/img/scale-sim.png``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_model as sm
import scale_plot
from stashpoint import __version__
from stashpoint.engine.persist import build_index
from stashpoint.engine.publish import save_metadata
from stashpoint.engine.records import Written
from stashpoint.format.fragment import fragment_bytes, fragment_ref
from stashpoint.format.index import FORMAT_VERSION, ChunkRecord, FragmentRef, Index, expand_index
from stashpoint.planning.index_layout import plan_grids
from stashpoint.planning.load_plan import plan_load
from stashpoint.planning.save_plan import build_save_plan

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CRC_BLOCK = 1 << 20
SAVE_ID = "5ca1e5a7e000"
#: the process CPU seconds of every timed call, in order (wall time on a busy machine
#: counts other processes' turns; CPU time does not)
CPU_SECONDS: list[float] = []
#: the wall seconds of every timed call, in order (the fastest of a call's repeats is the
#: one least disturbed by other work)
WALL_SECONDS: list[float] = []
#: the load measurements whose worst over N/2, N and 2N is printed
WORST = ("seconds", "min_seconds", "cpu_seconds", "peak_bytes")


def measured(fn, repeats: int = 1, trace: bool = True):
    """(result, median seconds, peak traced bytes): timings untraced, memory in one more run
    (``trace=False``: no memory run, peak None)."""
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        t, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - t)
        CPU_SECONDS.append(time.process_time() - cpu)
        WALL_SECONDS.append(times[-1])
    if not trace:
        return result, statistics.median(times), None
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, statistics.median(times), peak


def rank_chunks(kind: str, world: int, rank: int, side: dict, model) -> tuple[list, list]:
    """The chunks rank ``rank`` writes, for its fragment (grid tensors) and for index.json
    (the rest), with byte ranges as its data file would have them."""
    grids, owned = side["grids"], {}
    for (shape, tp), members in sm.classes(model).items():
        grid = grids.get(members[0].fqn)
        if grid is not None:
            owned[shape, tp] = [(c.offsets, c.shape) for c in sm.owned_cells(grid, kind, tp, world, rank)]
    mine = side["explicit"].get(rank, {})
    into, rest, pos = [], [], 8 + 128 * len(model)  # header: about 128 bytes an entry
    file = f"data-{rank:05d}.safetensors"
    for it in sorted(model, key=lambda m: m.fqn):
        grid = it.fqn in grids
        for offsets, shape in owned[it.shape, it.tp] if grid else mine.get(it.fqn, ()):
            n = 4
            for s in shape:
                n *= s
            crc = tuple(3_000_000_000 - i for i in range(max(1, -(-n // CRC_BLOCK))))
            key = f"{it.fqn}@{','.join(map(str, offsets))}" if shape != it.shape else it.fqn
            (into if grid else rest).append(
                (it.fqn, ChunkRecord(offsets, shape, file, key, (pos, pos + n), crc))
            )
            pos += n
    return into, rest


def _explicit(plan, grids) -> dict[int, dict[str, list]]:
    """rank -> fqn -> the boxes it writes of tensors that have no grid."""
    out: dict[int, dict[str, list]] = {}
    for rank, writes in enumerate(plan.writes):
        for w in writes:
            if w.fqn not in grids:
                out.setdefault(rank, {}).setdefault(w.fqn, []).append((w.box.offsets, w.box.shape))
    return out


def _rule_side(kind: str, world: int, model) -> dict:
    grids = {it.fqn: sm.rule_grid(kind, it.tp, it.shape, world) for it in model if it.shape}
    scalars = [it.fqn for it in model if not it.shape]
    explicit = {}
    for i, fqn in enumerate(scalars):
        explicit.setdefault(i % world, {})[fqn] = [((), ())]
    return {"grids": grids, "explicit": explicit, "save_plan": None, "plan_grids": None}


def plan_side(kind: str, world: int, model, args) -> dict:
    """Save plan and grid inference on the real plan (up to ``--plan-max`` ranks; its memory
    up to ``--trace-plan-max``: tracing makes the planner five times slower)."""
    rule = _rule_side(kind, world, model)
    if world > args.plan_max:
        return rule
    inventories = [sm.inventory(kind, world, r, model) for r in range(world)]
    plan, plan_s, plan_peak = measured(
        lambda: build_save_plan(inventories), trace=world <= args.trace_plan_max
    )
    inventories.clear()
    grids, grids_s, grids_peak = measured(lambda: plan_grids(plan))
    same = all(
        (g.splits, g.first, g.steps, g.exceptions)
        == (rule["grids"][f].splits, rule["grids"][f].first, rule["grids"][f].steps, ())
        for f, g in grids.items()
    )
    return {
        "grids": grids,
        "explicit": _explicit(plan, grids),
        "save_plan": {"seconds": plan_s, "peak_bytes": plan_peak, "writes": sum(map(len, plan.writes))},
        "plan_grids": {
            "seconds": grids_s,
            "peak_bytes": grids_peak,
            "grid_tensors": len(grids),
            "equal_to_layout_rule": same,
            "file_exceptions": sum(len(g.exceptions) for g in grids.values()),
        },
    }


def build_side(kind: str, world: int, model, side: dict, keep: set[int], sample: int) -> dict:
    """Every rank's fragment (sizes, digests), the coordinator's index, the kept fragments' bytes.

    Beyond ``sample`` ranks only the kept fragments and every (world/sample)-th are built;
    the others are given the sampled mean size and a digest no load checks (only kept
    fragments are read), and the total is reported as an estimate."""
    plans = sm.item_plans(kind, world, model)
    contributions: list[list] = [[] for _ in range(world)]
    frag_bytes, kept, sizes = 0, {}, []
    built = set(range(world)) if world <= sample else keep | set(range(0, world, world // sample))
    for rank in range(world):
        if rank not in built:
            continue
        into, rest = rank_chunks(kind, world, rank, side, model)
        contributions[rank] += [Written(fqn=f, per_rank=False, dtype="float32", record=c) for f, c in rest]
        if not into:
            continue
        raw = fragment_bytes(into[0][1].file, SAVE_ID, FORMAT_VERSION, into)
        contributions[rank].append(fragment_ref(rank, into[0][1].file, raw))
        frag_bytes += len(raw)
        sizes.append(len(raw))
        if rank in keep:
            kept[rank] = raw
    for rank in sorted(set(range(world)) - built):  # alike by symmetry: the sampled mean
        into, rest = rank_chunks(kind, world, rank, side, model) if side["explicit"].get(rank) else ([], [])
        contributions[rank] += [Written(fqn=f, per_rank=False, dtype="float32", record=c) for f, c in rest]
        size = round(statistics.mean(sizes))
        file = f"data-{rank:05d}.safetensors"
        contributions[rank].append(FragmentRef(rank, file, f"index-{rank:05d}.json", "0" * 64, size))
        frag_bytes += size
    meta = save_metadata(world, 1000, {}, SAVE_ID)
    _, frag_s, frag_peak = measured(
        lambda: fragment_bytes(
            "data-00000.safetensors", SAVE_ID, FORMAT_VERSION, rank_chunks(kind, world, 0, side, model)[0]
        )
    )
    index, build_s, build_peak = measured(
        lambda: build_index(plans, contributions, meta, CRC_BLOCK, side["grids"])
    )
    text = index.to_json()
    return {
        "index": index,
        "text": text,
        "kept": kept,
        "row": {
            "rank_fragment": {"seconds": frag_s, "peak_bytes": frag_peak, "bytes": len(kept.get(0, b""))},
            "coordinator_index": {"seconds": build_s, "peak_bytes": build_peak},
            "index_json_bytes": len(text.encode()),
            "fragments_bytes": frag_bytes,
            "fragments_built": len(built),
        },
    }


def loads(kind: str, world: int) -> list[int]:
    out = [w for w in (world // 2, world, world * 2) if w >= (8 if kind == "fsdp_tp" else 1)]
    return out if kind == "fsdp" else [w for w in out if w % sm.TP == 0]


def needed_ranks(kind: str, world: int, load_world: int, grids, model) -> set[int]:
    rank = load_world // 2
    out = set()
    for (shape, tp), members in sm.classes(model).items():
        grid = grids.get(members[0].fqn)
        for b in sm.boxes(kind, tp, shape, load_world, rank) if grid is not None else ():
            out |= {c.rank for c in grid.cells(b.offsets, b.shape)}
    return out


def load_side(kind: str, world: int, load_world: int, directory: Path, model, repeats: int) -> dict:
    rank = load_world // 2
    targets = sm.targets(kind, load_world, rank, model)
    read = {"n": 0, "bytes": 0}

    def run():
        index = Index.from_json((directory / "index.json").read_bytes(), "sim")

        def fetch(ref):
            raw = (directory / ref.fragment).read_bytes()
            read["n"], read["bytes"] = read["n"] + 1, read["bytes"] + len(raw)
            return raw

        grid_chunks = index.grid_chunks(fetch, "sim")
        kw = {"rank": rank, "world_size": load_world, "strict": True, "verify": True}
        return plan_load(
            index,
            targets,
            [],
            **kw,
            allow_pickle=False,
            per_rank="error",
            where="sim",
            grid_chunks=lambda f, rec, boxes: grid_chunks.overlapping(
                f, rec, [(b.offsets, b.shape) for b in boxes]
            ),
        )

    _, parse_s, parse_peak = measured(
        lambda: Index.from_json((directory / "index.json").read_bytes(), "sim"), repeats
    )
    parse_cpu = statistics.median(CPU_SECONDS[-repeats:])
    parse_min = min(WALL_SECONDS[-repeats:])
    plan, total_s, total_peak = measured(run, repeats)
    total_cpu = statistics.median(CPU_SECONDS[-repeats:])
    total_min = min(WALL_SECONDS[-repeats:])
    runs = repeats + 1
    return {
        "load_world": load_world,
        "rank": rank,
        "parse_seconds": parse_s,
        "parse_min_seconds": parse_min,
        "parse_cpu_seconds": parse_cpu,
        "parse_and_plan_cpu_seconds": total_cpu,
        "parse_peak_bytes": parse_peak,
        "parse_and_plan_seconds": total_s,
        "parse_and_plan_min_seconds": total_min,
        "parse_and_plan_peak_bytes": total_peak,
        "fragments_read": read["n"] // runs,
        "fragment_bytes_read": read["bytes"] // runs,
        "chunk_reads": sum(len(t.reads) for t in plan.tensors),
        "bytes_to_read": plan.bytes_to_read,
    }


def explicit_side(built: dict, repeats: int) -> dict:
    """The same index in format 2's explicit form (every chunk listed in index.json)."""
    index = built["index"]
    raws = {f"index-{r:05d}.json": raw for r, raw in built["kept"].items()}
    full = expand_index(index, lambda ref: raws[ref.fragment], "sim")
    v2 = Index(
        metadata=full.metadata, items=full.items, crc_block_bytes=full.crc_block_bytes, format_version=2
    ).to_json()
    _, parse_s, parse_peak = measured(lambda: Index.from_json(v2, "sim"), repeats)
    return {"index_json_bytes": len(v2.encode()), "parse_seconds": parse_s, "parse_peak_bytes": parse_peak}


def one(kind: str, world: int, args, model) -> dict:
    t0 = time.perf_counter()
    side = plan_side(kind, world, model, args)
    keep = set().union(*(needed_ranks(kind, world, w, side["grids"], model) for w in loads(kind, world)))
    explicit = world <= args.explicit_max
    built = build_side(kind, world, model, side, set(range(world)) if explicit else keep, args.sample)
    row = {
        "layout": kind,
        "world": world,
        **{k: v for k, v in side.items() if k not in ("grids", "explicit")},
    }
    row.update(built["row"])
    row["index_total_bytes"] = row["index_json_bytes"] + row["fragments_bytes"]
    row["index_bytes_per_rank"] = row["index_total_bytes"] / world
    with tempfile.TemporaryDirectory(prefix="scale-sim-") as tmp:
        d = Path(tmp)
        (d / "index.json").write_text(built["text"])
        for rank, raw in built["kept"].items():
            (d / f"index-{rank:05d}.json").write_bytes(raw)
        row["loads"] = [load_side(kind, world, w, d, model, args.repeats) for w in loads(kind, world)]
    if explicit:
        row["explicit_v2"] = explicit_side(built, args.repeats)
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:  # Linux, as every machine this runs on
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


def _doc(args, model, rows) -> dict:
    return {
        "what": "benchmarks/scale_sim.py: simulated 70B-class state, planning and index only",
        "items": len(model),
        "software": {"torch": importlib.metadata.version("torch"), "stashpoint": __version__},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": _cpu_model(),
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "note": "a shared 2-core machine; other work ran at the same time",
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("append",)},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="8,64,512,1024,8192")
    ap.add_argument("--layouts", default="fsdp,fsdp_tp")
    ap.add_argument("--plan-max", type=int, default=512)
    ap.add_argument("--trace-plan-max", type=int, default=64)
    ap.add_argument("--explicit-max", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=512, help="ranks whose fragments are built, beyond")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / f"scale-sim-{datetime.date.today()}.json")
    )
    ap.add_argument("--append", action="store_true", help="keep the rows of other runs in --out")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "scale-sim.png"))
    args = ap.parse_args()
    model = sm.items()
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.append and out.exists() else []
    for kind in args.layouts.split(","):
        for world in map(int, args.worlds.split(",")):
            row = one(kind, world, args, model)
            rows = [r for r in rows if (r["layout"], r["world"]) != (kind, world)] + [row]
            rows.sort(key=lambda r: (r["layout"], r["world"]))
            out.write_text(json.dumps(_doc(args, model, rows), indent=1) + "\n")
            worst = {k: max(r[f"parse_and_plan_{k}"] for r in row["loads"]) for k in WORST}
            print(
                f"{kind:8} N={world:5}: index {row['index_json_bytes'] / MIB:7.2f} MiB + fragments "
                f"{row['fragments_bytes'] / MIB:9.1f} MiB; parse+plan <= {worst['seconds']:.3f}s median, "
                f"{worst['min_seconds']:.3f}s fastest, {worst['cpu_seconds']:.3f}s CPU, peak "
                f"{worst['peak_bytes'] / MIB:.1f} MiB ({row['wall_seconds']:.0f}s)",
                flush=True,
            )
    doc = _doc(args, model, rows)
    scale_plot.plot(doc, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
