"""Export to HF safetensors: stashpoint (streaming) vs DCP's dcp_to_torch_save + safetensors.save_file.

The same model state is saved once by stashpoint and once by ``dcp.save``; each
conversion then runs in its own fresh process (page cache dropped first when
possible), which reports its wall time and peak RSS (VmHWM).  Results go to ``--out``.

    python benchmarks/convert_bench.py --gb 1.5 --out benchmarks/results/convert-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
tool, src, out = sys.argv[1:4]
import torch
base = hwm()
t0 = time.perf_counter()
if tool == "stashpoint":
    from stashpoint.convert import export_hf
    export_hf(src, out, max_shard_bytes=5 * 10**9)
else:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    tmp = out + ".pt"
    dcp_to_torch_save(src, tmp)
    state = torch.load(tmp, weights_only=True)
    os.makedirs(out, exist_ok=True)
    save_file({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    os.unlink(tmp)
took = time.perf_counter() - t0
print(json.dumps({"seconds": took, "peak_rss_bytes": hwm(), "rss_growth_bytes": hwm() - base}))
"""


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.5, help="model size (fp32 weights)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    import torch.distributed.checkpoint as dcp

    import stashpoint

    work = args.dir or tempfile.mkdtemp(prefix="stashpoint-convert-bench-")
    # transformer-like tensors: a big embedding and many 4096 x 1024 matrices
    n_bytes = int(args.gb * 1e9)
    state = {"model.embed.weight": torch.randn(32000, 1024)}
    i = 0
    while sum(t.numel() * 4 for t in state.values()) < n_bytes:
        state[f"model.layers.{i}.weight"] = torch.randn(4096, 1024)
        i += 1
    total = sum(t.numel() * 4 for t in state.values())
    sp, dc = os.path.join(work, "sp"), os.path.join(work, "dcp")
    stashpoint.save(state, sp, overwrite=True)
    dcp.save(state, checkpoint_id=dc)
    del state
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")}
    runs: dict[str, list[dict]] = {
        "stashpoint": [],
        "stashpoint_from_dcp": [],
        "dcp_to_torch_save+save_file": [],
    }
    dropped = False
    for _ in range(args.repeat):
        for name, tool, src in (
            ("stashpoint", "stashpoint", sp),
            ("stashpoint_from_dcp", "stashpoint", dc),
            ("dcp_to_torch_save+save_file", "dcp", dc),
        ):
            out = os.path.join(work, f"out-{name}")
            shutil.rmtree(out, ignore_errors=True)
            dropped = _drop_caches()
            cp = subprocess.run(
                [sys.executable, "-c", CHILD, tool, src, out],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            rec = json.loads(cp.stdout.strip().splitlines()[-1])
            rec["gb_per_s"] = total / rec["seconds"] / 1e9
            runs[name].append(rec)
            print(name, rec, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU",
        "torch": torch.__version__,
        "stashpoint": stashpoint.__version__,
        "model_bytes": total,
        "tensors": i + 1,
        "cache_dropped": dropped,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
