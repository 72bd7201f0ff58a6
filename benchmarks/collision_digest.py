"""What the save-time collision check costs: digests of replicated module tensors.

Every rank of a save with more than one rank digests each plain (non-DTensor) tensor of
its modules and optimizers before the plan is made (docs/LAYOUTS.md, "Collisions and
partial loads").  This script times ``content_digests`` over a state of ``--gib`` GiB in
tensors shaped like a GPT's (bf16 weights, fp32 master weights and Adam moments), on the
GPU when there is one (one pass of int64 word sums per tensor, one synchronisation) and on the CPU
(CRC-32C), next to a plain device-to-host copy of the same bytes for scale.  It also
checks that the GPU and CPU word sums agree.  Usage::

    python benchmarks/collision_digest.py --gib 16 --out digest.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "src")
from stashpoint.engine.tensors import content_digests, word_sums


def state(gib: float, device: str) -> list[torch.Tensor]:
    """Tensors of about ``gib`` GiB: per block, bf16 weights and three fp32 copies."""
    out, total, hidden = [], 0, 2048
    while total < gib * 2**30:
        for shape in ((hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
            out.append(torch.randn(shape, device=device, dtype=torch.bfloat16))
            out += [torch.randn(shape, device=device) for _ in range(3)]
            total += sum(t.numel() * t.element_size() for t in out[-4:])
    return out


def timed(fn, tensors: list[torch.Tensor], repeats: int) -> float:
    fn(tensors[:4])
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(tensors)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--cpu-gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    result: dict = {"torch": torch.__version__}
    if torch.cuda.is_available():
        tensors = state(args.gib, "cuda")
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        digest_s = timed(content_digests, tensors, args.repeats)
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        d2h_s = timed(
            lambda ts: [p.copy_(t, non_blocking=True) for p, t in zip(pinned, ts)], tensors, args.repeats
        )
        agree = all(
            word_sums(t.reshape(-1)) == word_sums(p.reshape(-1)) for t, p in zip(tensors[:16], pinned)
        )
        result["gpu"] = {
            "device": torch.cuda.get_device_name(),
            "tensors": len(tensors),
            "bytes": nbytes,
            "digest_s": digest_s,
            "digest_gb_per_s": nbytes / digest_s / 1e9,
            "pinned_d2h_s": d2h_s,
            "word_sums_gpu_equals_cpu": agree,
        }
        del tensors, pinned
    cpu = state(args.cpu_gib, "cpu")
    nbytes = sum(t.numel() * t.element_size() for t in cpu)
    cpu_s = timed(content_digests, cpu, args.repeats)
    result["cpu"] = {
        "tensors": len(cpu),
        "bytes": nbytes,
        "digest_s": cpu_s,
        "digest_gb_per_s": nbytes / cpu_s / 1e9,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
