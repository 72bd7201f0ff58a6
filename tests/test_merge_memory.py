"""Peak memory of a merge follows the largest tensor, not the model.

Each merge runs in a child process that reports how far its peak RSS (``VmHWM``,
reset before each merge) rose above its RSS before the merge, after imports and a
warm-up merge.  Models are made of 4 MiB
tensors: 8 of them (32 MiB) and 64 of them (256 MiB), three checkpoints each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import stashpoint

TENSOR = 4 << 20
CHILD = r"""
import json, sys
import torch
import stashpoint

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def growth(fn):
    # VmHWM belongs to this process's own address space (ru_maxrss would carry the
    # parent's peak across fork and exec); writing 5 to clear_refs resets it to VmRSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    result = fn()
    return status("VmHWM") - before, result

d = sys.argv[1]
stashpoint.save({"model": {"w": torch.ones(4)}}, f"{d}/tiny")
tiny = [f"{d}/tiny"] * 2
stashpoint.merge(out=f"{d}/w1", models=tiny, method="uniform")
stashpoint.save({"model": {"w": torch.zeros(4)}}, f"{d}/tiny0")
stashpoint.merge(
    out=f"{d}/w2", models=tiny, base_model=f"{d}/tiny0", method="ties", parameters={"density": 0.5}
)
small = [f"{d}/small{i}" for i in range(3)]
big = [f"{d}/big{i}" for i in range(3)]
out = {}
out["uniform_small"], _ = growth(lambda: stashpoint.merge(out=f"{d}/o1", models=small, method="uniform"))
out["uniform_big"], r = growth(lambda: stashpoint.merge(out=f"{d}/o2", models=big, method="uniform"))
out["bytes_read"] = r.bytes_read
out["ties_big"], _ = growth(
    lambda: stashpoint.merge(
        out=f"{d}/o3", models=big[1:], base_model=big[0], method="ties", parameters={"density": 0.5}
    )
)
print(json.dumps(out))
"""


def _save(path, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    stashpoint.save({"model": {f"layer{j}": torch.randn(TENSOR // 4, generator=g) for j in range(n)}}, path)


def test_peak_rss_is_bounded_by_tensor_size_not_model_size(tmp_path):
    for i in range(3):
        _save(tmp_path / f"small{i}", 8, i)
        _save(tmp_path / f"big{i}", 64, i)
    # one malloc arena: glibc's per-thread arenas (the readers run in a thread pool) add
    # tens of MiB of noise to RSS that has nothing to do with the model's size
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    model = 64 * TENSOR
    assert m["bytes_read"] == 3 * model
    grew = {k: m[k] / TENSOR for k in ("uniform_small", "uniform_big", "ties_big")}
    # uniform average: an fp32 accumulator and one input tensor, plus allocator slack
    assert grew["uniform_big"] < 12, grew
    # a model eight times larger (224 MiB more) needs no more than allocator noise more
    assert grew["uniform_big"] < grew["uniform_small"] + 4, grew
    # TIES holds the tensor of every input and its deltas at once: still a fixed number of tensors
    assert grew["ties_big"] < 20, grew
    assert grew["ties_big"] * TENSOR < model / 3
