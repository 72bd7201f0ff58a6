"""The figure of ``scale_sim.py``: index size, load-side time and memory against ranks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MIB = 1 << 20


def _seconds(load: dict) -> float:
    """CPU seconds where measured (wall time on a busy shared machine counts others' turns)."""
    return load.get("parse_and_plan_cpu_seconds", load["parse_and_plan_seconds"])


def plot(doc: dict, out: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind, marker in (("fsdp", "o"), ("fsdp_tp", "s")):
        rows = [r for r in doc["rows"] if r["layout"] == kind]
        if not rows:
            continue
        n = [r["world"] for r in rows]
        label = "FSDP" if kind == "fsdp" else "FSDP x TP(8)"
        ax = axes[0]
        ax.plot(
            n,
            [r["index_total_bytes"] / MIB for r in rows],
            marker=marker,
            label=f"{label}: all fragments + index.json",
        )
        ax.plot(
            n,
            [r["index_json_bytes"] / MIB for r in rows],
            marker=marker,
            ls="--",
            label=f"{label}: index.json",
        )
        ex = [r for r in rows if "explicit_v2" in r]
        if ex:
            ax.plot(
                [r["world"] for r in ex],
                [r["explicit_v2"]["index_json_bytes"] / MIB for r in ex],
                marker=marker,
                ls=":",
                label=f"{label}: format 2 (explicit)",
            )
        same = [[load for load in r["loads"] if load["load_world"] == r["world"]][0] for r in rows]
        axes[1].plot(n, [_seconds(s) for s in same], marker=marker, label=f"{label}: same N")
        axes[1].plot(
            n,
            [max(_seconds(x) for x in r["loads"]) for r in rows],
            marker=marker,
            ls="--",
            label=f"{label}: worst of N/2, N, 2N",
        )
        axes[2].plot(
            n,
            [max(x["parse_and_plan_peak_bytes"] for x in r["loads"]) / MIB for r in rows],
            marker=marker,
            label=f"{label}: worst of N/2, N, 2N",
        )
        planned = [r for r in rows if r.get("save_plan")]
        traced = [r for r in planned if r["save_plan"]["peak_bytes"] is not None]
        if planned:
            axes[1].plot(
                [r["world"] for r in planned],
                [r["save_plan"]["seconds"] for r in planned],
                marker=marker,
                ls=":",
                label=f"{label}: save plan (today)",
            )
            axes[2].plot(
                [r["world"] for r in traced],
                [r["save_plan"]["peak_bytes"] / MIB for r in traced],
                marker=marker,
                ls=":",
                label=f"{label}: save plan (today)",
            )
    titles = (
        "index on disk (MiB)",
        "loading rank: parse + load plan (CPU s)",
        "loading rank: peak memory (MiB)",
    )
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks at save (N)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="red", lw=0.8)
    axes[2].axhline(256, color="red", lw=0.8)
    fig.suptitle("70B-class state (80 layers, hidden 8192, vocab 128K, params + Adam), simulated")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
