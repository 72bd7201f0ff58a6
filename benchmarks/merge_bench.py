"""Merge benchmark: stashpoint's streaming merge against loading every checkpoint whole.

What is measured:

* **Model.**  K checkpoints (``--k``, default 4) of a ~1.5 GB fp32 model (``--gb``) shaped
  like a small LLM: an embedding of 32000 x 2048 (262 MB, the largest tensor) and
  2048 x 4096 matrices (33.5 MB each).  Saved once with ``stashpoint.save`` (one process:
  the data file is an ordinary safetensors file) and with ``torch.save`` (for the
  ``torch.load`` row), and reused between runs when present.
* **Merge.**  A uniform average of the K checkpoints, written to disk (fsync'd):

  - ``stashpoint``: ``stashpoint.merge(out, models=paths, method="uniform")``, one tensor
    at a time, fp32 accumulation, output a stashpoint checkpoint;
  - ``naive-safetensors``: ``safetensors.torch.load_file`` of every checkpoint's data file,
    then the average tensor by tensor, ``save_file`` and ``fsync``;
  - ``naive-torch-load``: ``torch.load(weights_only=True)`` of every ``.pt`` file, then the
    same average, ``save_file`` and ``fsync``.

* **Process.**  Each run is its own child process.  Peak RSS is the child's ``VmHWM``
  (reset with ``/proc/self/clear_refs`` after imports, so the interpreter and torch do
  not count), reported both as the rise above the RSS at that point and as the whole
  process's peak.  Input GB/s = K x model bytes / wall seconds (GB = 1e9 bytes).
* **Cache.**  Before each run the page cache is dropped when permitted (root); otherwise
  the JSON says ``"warm"`` and inputs are read from RAM.  ``--repeats`` (default 3) runs of
  each, the order rotating; the median is reported.  The outputs of the approaches are
  compared (max abs difference) at the end.

Run:  ``.venv/bin/python benchmarks/merge_bench.py [--k 4] [--gb 1.5] [--dir /tmp/...]``
Output: a table on stdout and ``benchmarks/results/merge-cpu-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

EMB = (32000, 2048)
LAYER = (2048, 4096)
APPROACHES = ("stashpoint", "naive-safetensors", "naive-torch-load")


def layer_count(gb: float) -> int:
    return max(1, round((gb * 1e9 - EMB[0] * EMB[1] * 4) / (LAYER[0] * LAYER[1] * 4)))


def make_inputs(d: str, k: int, gb: float) -> dict:
    import torch

    import stashpoint

    n = layer_count(gb)
    spec = {"k": k, "layers": n, "emb": list(EMB), "layer": list(LAYER)}
    marker = os.path.join(d, "spec.json")
    if os.path.exists(marker) and json.load(open(marker)) == spec:
        return spec
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        sd = {"embed.weight": torch.randn(EMB, generator=g)}
        for j in range(n):
            sd[f"layers.{j}.weight"] = torch.randn(LAYER, generator=g)
        stashpoint.save({"model": sd}, os.path.join(d, f"ckpt{i}"), step=1000 * (i + 1))
        torch.save({f"model.{name}": t for name, t in sd.items()}, os.path.join(d, f"ckpt{i}.pt"))
        del sd
    json.dump(spec, open(marker, "w"))
    return spec


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _average_whole(sds: list[dict], out: str) -> None:
    from safetensors.torch import save_file

    avg = {}
    for name in sds[0]:
        acc = sds[0][name].float().clone()
        for sd in sds[1:]:
            acc.add_(sd[name])
        avg[name] = acc.div_(len(sds))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    save_file(avg, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def child(approach: str, d: str, k: int, out: str) -> dict:
    import torch
    from safetensors.torch import load_file

    import stashpoint
    import stashpoint.engine.load  # imports are not part of the merge time
    import stashpoint.merging

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    paths = [os.path.join(d, f"ckpt{i}") for i in range(k)]
    if approach == "stashpoint":
        stashpoint.merge(out=out, models=paths, method="uniform")
    elif approach == "naive-safetensors":
        _average_whole([load_file(os.path.join(p, "data-00000.safetensors")) for p in paths], out)
    elif approach == "naive-torch-load":
        _average_whole([torch.load(p + ".pt", weights_only=True) for p in paths], out)
    else:
        raise ValueError(approach)
    seconds = time.perf_counter() - t0
    hwm = _status("VmHWM")
    return {"seconds": seconds, "rss_before": before, "peak_rss": hwm, "peak_rss_growth": hwm - before}


def drop_caches() -> str:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return "dropped"
    except OSError:
        return "warm"


def load_output(path: str):
    from safetensors.torch import load_file

    import stashpoint

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    return stashpoint.load_full(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--gb", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/stashpoint-merge-bench")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/merge-cpu-<date>.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    inputs = os.path.join(args.dir, "inputs")
    if args.child:
        print(json.dumps(child(args.child, inputs, args.k, args.child_out)))
        return
    import torch

    import stashpoint

    spec = make_inputs(inputs, args.k, args.gb)
    model_bytes = (EMB[0] * EMB[1] + spec["layers"] * LAYER[0] * LAYER[1]) * 4
    runs: dict[str, list[dict]] = {a: [] for a in APPROACHES}
    cache = "warm"
    for r in range(args.repeats):
        order = APPROACHES[r % 3 :] + APPROACHES[: r % 3]
        for approach in order:
            out = os.path.join(args.dir, f"out-{approach}")
            shutil.rmtree(out, ignore_errors=True)
            cache = drop_caches()
            cmd = [sys.executable, __file__, "--child", approach, "--child-out", out, "--dir", args.dir]
            proc = subprocess.run([*cmd, "--k", str(args.k)], capture_output=True, text=True, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["input_gb_per_s"] = args.k * model_bytes / 1e9 / res["seconds"]
            runs[approach].append(res)
            print(
                f"repeat {r} {approach:18s} {res['seconds']:.2f} s  {res['input_gb_per_s']:.2f} GB/s  "
                f"peak +{res['peak_rss_growth'] / 2**30:.2f} GiB",
                flush=True,
            )
    ref = load_output(os.path.join(args.dir, "out-naive-safetensors"))
    diffs = {}
    for approach in ("stashpoint", "naive-torch-load"):
        got = load_output(os.path.join(args.dir, f"out-{approach}"))
        diffs[approach] = max(float((got[n] - ref[n]).abs().max()) for n in ref)
        del got
    median = {
        a: {
            key: statistics.median(x[key] for x in rs)
            for key in ("seconds", "input_gb_per_s", "peak_rss", "peak_rss_growth")
        }
        for a, rs in runs.items()
    }
    doc = {
        "benchmark": "merge uniform average",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "description": "2-core CPU" if os.cpu_count() == 2 else f"{os.cpu_count()}-core CPU",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "torch_version": torch.__version__,
        "stashpoint_version": stashpoint.__version__,
        "page_cache": cache,
        "k": args.k,
        "model_bytes": model_bytes,
        "largest_tensor_bytes": EMB[0] * EMB[1] * 4,
        "tensors_per_model": 1 + spec["layers"],
        "input_bytes": args.k * model_bytes,
        "repeats": args.repeats,
        "max_abs_diff_vs_naive_safetensors": diffs,
        "median": median,
        "raw": runs,
    }
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"merge-cpu-{doc['date']}.json"
    )
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\n{'approach':18s} {'seconds':>8s} {'input GB/s':>10s} {'peak RSS rise':>14s} {'peak RSS':>9s}")
    for a, m in median.items():
        print(
            f"{a:18s} {m['seconds']:8.2f} {m['input_gb_per_s']:10.2f} "
            f"{m['peak_rss_growth'] / 2**30:11.2f} GiB {m['peak_rss'] / 2**30:5.2f} GiB"
        )
    print(f"max |difference| vs naive-safetensors: {diffs}; page cache {cache}; wrote {path}")


if __name__ == "__main__":
    main()
