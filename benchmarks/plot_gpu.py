"""Plot the single-GPU results: training stall and time to durable commit per save, per tool.

Usage: ``python benchmarks/plot_gpu.py RESULT.json... -o docs/img/gpu-single.png``
(the ``single`` part files written by ``gpu_bench.py``).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    tools: dict[str, list[dict]] = {}
    for path in args.results:
        with open(path) as f:
            doc = json.load(f)
        for name, res in doc["single"]["tools"].items():
            tools[name] = [s for s in res["saves"] if "error" not in s]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, saves in tools.items():
        xs = [s["save"] + 1 for s in saves]
        ax1.plot(xs, [s["stall_s"] for s in saves], marker="o", label=name)
        ax2.plot(xs, [s["commit_s"] for s in saves], marker="o", label=name)
    ax1.set_yscale("log")
    ax1.set_title("training-thread stall per save (s, log)")
    ax2.set_title("time to durable commit per save (s)")
    for ax in (ax1, ax2):
        ax.set_xlabel("save #")
        ax.grid(alpha=0.3)
    ax1.axhline(0.05, color="grey", linestyle="--", linewidth=1)
    ax2.legend(fontsize="small")
    fig.suptitle("16.66 GiB state on one H200 (bf16 weights, fp32 master, Adam moments)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
