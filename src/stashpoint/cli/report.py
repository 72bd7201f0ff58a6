"""``stashpoint report FILE.jsonl... [--plot OUT.png]``: what saves and loads cost.

Reads telemetry records (one JSON object per line, written by
:class:`~stashpoint.manager.CheckpointManager` or by any save/load when
``$STASHPOINT_TELEMETRY`` is set) and prints one row per event with its phase
timings, bytes and throughput; ``--plot`` draws a timeline, one bar per event
split into its phases.
"""

from __future__ import annotations

import json

from stashpoint.textfmt import human_bytes, table

#: save and load phases in the order they happen (records store them sorted by name)
PHASES = [
    "plan",
    "plan_cached",
    "grids",
    "wait_buffer",
    "device_to_host",
    "checksum",
    "write",
    "fsync",
    "wait_ranks",
    "wait_commit",
    "commit",
    "read",
    "host_to_device",
]


def in_order(phase_seconds: dict[str, float]) -> list[tuple[str, float]]:
    """``(phase, seconds)`` in the order the phases happen; unknown phases last, by name."""
    rank = {name: i for i, name in enumerate(PHASES)}
    return sorted(phase_seconds.items(), key=lambda kv: (rank.get(kv[0], len(PHASES)), kv[0]))


def load_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise SystemExit(f"stashpoint report: {path}:{n}: not a JSON line") from None
    records.sort(key=lambda r: r.get("time_unix", 0))
    return records


def render_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        phases = r.get("phase_seconds", {})
        nbytes = r.get("bytes_written", r.get("bytes_read", 0))
        stall = r.get("stall_s")
        rows.append(
            [
                r.get("event", "?"),
                str(r.get("step", "")),
                str(r.get("rank", "")),
                r.get("mode", "") or "",
                f"{stall * 1e3:.1f}" if stall is not None else "",
                f"{r.get('seconds', sum(phases.values())):.3f}",
                human_bytes(nbytes),
                f"{r['gb_per_s']:.2f}" if r.get("gb_per_s") else "",
                " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in in_order(phases) if v >= 0.0005),
            ]
        )
    head = ["event", "step", "rank", "mode", "stall ms", "total s", "bytes", "GB/s", "phases"]
    return table(head, rows, right={1, 2, 4, 5, 6, 7})


def plot_timeline(records: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    colors = dict(zip(PHASES, plt.get_cmap("tab20").colors))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.35 * len(records)))
    t0 = min(r.get("time_unix", 0) - r.get("seconds", 0) for r in records)
    seen = set()
    for y, r in enumerate(records):
        start = r.get("time_unix", 0) - r.get("seconds", 0) - t0
        for phase, secs in in_order(r.get("phase_seconds", {})):
            label = phase if phase not in seen else None
            seen.add(phase)
            ax.barh(y, secs, left=start, color=colors.get(phase, "grey"), label=label, height=0.7)
            start += secs
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([f"{r.get('event')} step {r.get('step', '')} r{r.get('rank', '')}" for r in records])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first event")
    ax.set_title("stashpoint: save and load phases")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(paths: list[str], plot: str | None = None) -> int:
    if plot:  # before any output: without matplotlib the command fails at once, in one line
        import matplotlib

        matplotlib.use("Agg")
    records = load_records(paths)
    if not records:
        print("no telemetry records")
        return 1
    print(render_table(records))
    saves = [r for r in records if r.get("event") == "save"]
    if saves:
        stalls = [r["stall_s"] for r in saves if r.get("stall_s") is not None]
        total = sum(r.get("bytes_written", 0) for r in saves)
        line = f"\n{len(saves)} saves, {human_bytes(total)} written"
        if stalls:
            line += f"; training stall median {sorted(stalls)[len(stalls) // 2] * 1e3:.1f} ms"
        print(line)
    if plot:
        plot_timeline(records, plot)
        print(f"timeline: {plot}")
    return 0
