"""GPU benchmark of memory snapshots protected against node loss, on one GPU (issue 13 item 5).

``--nodes`` trainer processes (default 3) share one device; each is one simulated node,
with its own memory root (``--shm``/nodeN) and its own keeper.  Each trains its own GPT
(``--dim``/``--layers``, AdamW) on its own data: no gradient exchange (no DDP), so the
GPU part stays simple; the gloo process group carries only stashpoint's control traffic
and the barriers.  The state is ``PerRank``: each rank's snapshot is its whole model
and optimizer.  Measured in one run (``gpu_protect_worker.py`` is the trainer process):

1. limits: pinned device-to-host GB/s of one rank alone and of all ranks copying at once
   (they share the link), the step time with every rank training, the state bytes per
   rank, and the link-limited interval ceil(state bytes x N / shared D2H / step time);
2. throughput (tokens/s summed over the ranks, every run the same steps, timed between
   barriers): no checkpointing; memory snapshots at the link-limited interval without
   protection, with ``Parity(group=2)`` (through the file system, and over TCP between
   the keepers), with ``Replicate(copies=1)``; parity every 10 steps.  Per run: snapshots
   taken and skipped (slots still busy sealing/protecting), stall p50, the keepers'
   protection time and lag (``protect``/``protect_lag`` of each
   snapshot's outcome), and each node's shared memory (its slots and what it holds for
   the others) against slots x shard bytes;
3. node loss: snapshots with parity every ``--loss-every`` steps, the last one also
   written durable; then one node's trainer and keeper are SIGKILLed and its memory root
   deleted, the other trainers are SIGKILLed as torchrun's agent restarts the workers
   (a gloo group cannot take in a new member; their keepers and snapshots stay), and N
   fresh trainers start (the lost node's on an empty memory root).  Times from the kill
   to every rank's first resumed step, with the recovery itself (rebuild from parity and
   load), bit-exact against a fingerprint of the state taken at the snapshot; then rank 0
   loads the same step from the durable checkpoint with a cold page cache.

Raw JSON to ``--out`` (and ``--out.partial`` as the parts finish).  Usage::

    python benchmarks/gpu_protect_bench.py --out protect-gpu.json
    python benchmarks/gpu_protect_bench.py --device cpu --dim 64 --layers 2 --steps 6 --out t.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "gpu_protect_worker.py")


class Ranks:
    """The trainer processes of one job: started together, their JSON events read on threads."""

    def __init__(self, role: str, args, config: str, expect: str = "") -> None:
        self.events: queue.Queue = queue.Queue()
        init = tempfile.mktemp(prefix="sp-protect-rdzv-", dir=args.dir)
        self.started = time.time()
        self.wall_deadline = time.monotonic() + args.t0 + args.wall_s - self.started
        self.procs = []
        for rank in range(args.nodes):
            cmd = [sys.executable, WORKER, "--role", role, "--rank", str(rank), "--world", str(args.nodes)]
            cmd += ["--init", init, "--config", config, "--expect", expect]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, args=(p,), daemon=True).start()
            self.procs.append(p)

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
            else:
                sys.stdout.write(line)

    def next(self, deadline: float) -> dict | None:
        """The next event; None when every process has exited (or the deadline passed: killed)."""
        deadline = min(deadline, self.wall_deadline)
        while True:
            try:
                return self.events.get(timeout=0.5)
            except queue.Empty:
                pass
            if all(p.poll() is not None for p in self.procs) and self.events.empty():
                return None
            if time.monotonic() > deadline:
                print("time is up: killing the trainers", flush=True)
                self.kill()
                return None

    def kill(self, ranks: list[int] | None = None) -> None:
        for r in range(len(self.procs)) if ranks is None else ranks:
            if self.procs[r].poll() is None:
                self.procs[r].kill()
        for r in range(len(self.procs)) if ranks is None else ranks:
            self.procs[r].wait(60)

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]


def keepers_of(shm: str) -> list[int]:
    """The keeper processes whose memory root lies under ``shm`` (one simulated node's)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"stashpoint.engine.keeper_main" in argv and any(a.startswith(shm.encode() + b"/") for a in argv):
            out.append(int(pid))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def node_dir(args, rank: int) -> str:
    return os.path.join(args.shm, f"node{rank}")


def median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def combine(per_rank: list[dict]) -> dict:
    """One run's numbers over the ranks: tokens summed, seconds of the slowest rank."""
    r0 = per_rank[0]
    out = {k: r0[k] for k in ("name", "every", "protection", "steps")}
    out["seconds"] = max(r["seconds"] for r in per_rank)
    out["tokens_per_s"] = sum(r["tokens"] for r in per_rank) / out["seconds"]
    if "snapshots" in r0:
        phases = [p for r in per_rank for p in r["phase_s"]]
        out["snapshots"] = [r["snapshots"] for r in per_rank]
        out["skipped"] = [r["skipped"] for r in per_rank]
        out["stall_p50_s"] = median([s for r in per_rank for s in r["stall_s"]])
        out["protect_p50_s"] = median([p["protect"] for p in phases if "protect" in p])
        out["protect_lag_p50_s"] = median([p["protect_lag"] for p in phases if "protect_lag" in p])
        out["protect_lag_max_s"] = max((p["protect_lag"] for p in phases if "protect_lag" in p), default=None)
        out["checksum_p50_s"] = median([p["checksum"] for p in phases if "checksum" in p])
        out["memory"] = [r["memory"] for r in per_rank]
        ratios = [m["root_bytes"] / m["slots_x_shard"] for m in out["memory"] if m["slots_x_shard"]]
        out["memory_over_slots_x_shard"] = max(ratios, default=None)  # the node holding the most
        out["memory_mean_over_slots_x_shard"] = sum(ratios) / len(ratios) if ratios else None
    out["per_rank"] = per_rank
    return out


def part_bench(args, config: str, out: dict, save) -> None:
    """Parts 1 and 2: limits and the throughput runs, in one job of ``--nodes`` trainers."""
    job = Ranks("bench", args, config)
    deadline = time.monotonic() + args.budget_s + 120
    runs: dict[str, list[dict]] = {}
    out["runs"], out["skipped_runs"] = {}, {}
    while (ev := job.next(deadline)) is not None:
        if ev["event"] == "limits":
            out["limits"] = {k: v for k, v in ev.items() if k != "event"}
            lim = out["limits"]
            print(
                f"{lim['params_per_rank'] / 1e9:.2f}B params, "
                f"{lim['state_bytes_per_rank'] / 1e9:.2f} GB/rank, "
                f"{lim['step_s'] * 1e3:.0f} ms/step, D2H {lim['d2h_solo_gbps']:.1f} GB/s solo "
                f"{lim['d2h_shared_gbps']:.1f} shared, link-limited every {lim['link_limited_every']}",
                flush=True,
            )
        elif ev["event"] == "skipped":
            out["skipped_runs"][ev["name"]] = ev["why"]
            print(f"{ev['name']}: skipped, {ev['why']}", flush=True)
        elif ev["event"] == "run":
            got = runs.setdefault(ev["name"], [])
            got.append({k: v for k, v in ev.items() if k != "event"})
            if len(got) == args.nodes:
                run = combine(sorted(got, key=lambda r: r["rank"]))
                base = out["runs"].get("none", run)["tokens_per_s"]
                run["vs_no_checkpoint"] = run["tokens_per_s"] / base
                out["runs"][run["name"]] = run
                tps, vs = run["tokens_per_s"], run["vs_no_checkpoint"]
                print(f"{run['name']}: {tps:.0f} tok/s, {vs:.4f} of no checkpointing", flush=True)
        save()
    if any(c != 0 for c in job.exit_codes()):
        out["bench_exit_codes"] = job.exit_codes()


def lose_node(args, job: Ranks) -> float:
    """SIGKILL the lost node's keeper and every trainer; delete the node's memory; the kill's time."""
    lost = node_dir(args, args.kill_node)
    keepers = keepers_of(lost)
    t_kill = time.time()
    for pid in keepers:
        os.kill(pid, signal.SIGKILL)
    job.kill([args.kill_node])
    job.kill()  # the other trainers: restarted as a job is (their keepers stay)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in keepers) and time.monotonic() < deadline:
        time.sleep(0.01)
    shutil.rmtree(lost)
    os.makedirs(lost)  # the replacement node's empty memory
    return t_kill


def part_node_loss(args, config: str, out: dict, save) -> None:
    """Part 3: snapshots with parity, a lost node, N restarted trainers, a cold disk load."""
    res: dict = {"kill_node": args.kill_node, "loss_every": args.loss_every, "loss_steps": args.loss_steps}
    out["node_loss"] = res
    job = Ranks("train", args, config)
    ready: dict[int, dict] = {}
    deadline = time.monotonic() + 300
    while len(ready) < args.nodes and (ev := job.next(deadline)) is not None:
        if ev["event"] == "ready":
            ready[ev["rank"]] = ev
    if len(ready) < args.nodes:
        job.kill()
        res["error"] = f"the trainers did not all get ready: exit codes {job.exit_codes()}"
        save()
        return
    res["before"] = [ready[r] for r in range(args.nodes)]
    res["keepers_of_lost_node"] = len(keepers_of(node_dir(args, args.kill_node)))
    t_kill = lose_node(args, job)
    expect = os.path.join(args.dir, "expect.json")
    with open(expect, "w") as f:
        json.dump({str(r): ev["fingerprint"] for r, ev in ready.items()}, f)
    res["kill_to_respawn_s"] = time.time() - t_kill
    job = Ranks("resume", args, config, expect)
    resumed: dict[int, dict] = {}
    deadline = time.monotonic() + 300
    while (ev := job.next(deadline)) is not None:
        if ev["event"] == "resumed":
            at = ev.pop("at")
            ev["since_kill_s"] = at["first_step"] - t_kill
            ev["start_to_main_s"] = at["main"] - job.started  # interpreter, imports
            ev["setup_s"] = at["ready"] - at["main"]  # device, model, manager, keeper
            ev["load_latest_s"] = at["loaded"] - at["ready"]  # agree, rebuild, load
            ev["first_step_s"] = at["first_step"] - at["loaded"]
            resumed[ev["rank"]] = ev
            if len(resumed) == args.nodes:
                res["resumed"] = [resumed[r] for r in range(args.nodes)]
                res["kill_to_all_resumed_s"] = max(e["since_kill_s"] for e in resumed.values())
                took = res["kill_to_all_resumed_s"]
                print(f"node loss: every rank resumed {took:.1f}s after the kill", flush=True)
        elif ev["event"] == "disk":
            res["disk"] = {k: v for k, v in ev.items() if k != "event"}
        save()
    if any(c != 0 for c in job.exit_codes()):
        res["resume_exit_codes"] = job.exit_codes()
    save()


def summary(out: dict) -> str:
    lines = []
    lim = out.get("limits")
    if lim:
        lines.append(
            f"{lim['params_per_rank'] / 1e9:.3f}B params/rank, "
            f"state {lim['state_bytes_per_rank'] / 1e9:.2f} GB/rank, "
            f"step {lim['step_s'] * 1e3:.0f} ms, D2H {lim['d2h_shared_gbps']:.1f} GB/s shared by "
            f"{out['args']['nodes']}, link-limited every {lim['link_limited_every']}"
        )
    if out.get("runs") or out.get("skipped_runs"):
        head = f"{'run':<24}{'tok/s':>10}{'vs none':>9}{'snaps':>7}{'skip':>6}{'stall':>8}"
        lines.append(head + f"{'protect':>9}{'lag':>8}{'mem max/mean':>14}")

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}ms" if x < 10 else f"{x:.0f}s"

    for name, r in out.get("runs", {}).items():
        snaps, skip = r.get("snapshots", [0])[0], r.get("skipped", [0])[0]  # the same on every rank
        mem = r.get("memory_over_slots_x_shard")
        mem = "-" if mem is None else f"{mem:.2f}/{r['memory_mean_over_slots_x_shard']:.2f}"
        lines.append(
            f"{name:<24}{r['tokens_per_s']:>10.0f}{r['vs_no_checkpoint']:>9.4f}{snaps:>7}{skip:>6}"
            f"{ms(r.get('stall_p50_s')):>8}{ms(r.get('protect_p50_s')):>9}{ms(r.get('protect_lag_p50_s')):>8}{mem:>14}"
        )
    for name, why in out.get("skipped_runs", {}).items():
        lines.append(f"{name:<24}skipped: {why}")
    nl = out.get("node_loss", {})
    if "resumed" in nl:
        lost = nl["resumed"][nl["kill_node"]]
        lines.append(
            f"node loss (node {nl['kill_node']}): "
            f"kill -> every rank's first step {nl['kill_to_all_resumed_s']:.1f}s; "
            f"lost rank: load_latest {lost['load_latest_s']:.2f}s (recovery {lost['recovery_s']:.2f}s), "
            f"tier {lost['tier']} step {lost['step']}, bit-exact {all(e['bit_exact'] for e in nl['resumed'])}"
        )
    if "disk" in nl:
        d = nl["disk"]
        lost = nl.get("resumed", [{}] * (nl["kill_node"] + 1))[nl["kill_node"]]
        ratio = d["cold_load_s"] / lost["load_latest_s"] if lost.get("load_latest_s") else float("nan")
        lines.append(
            f"cold disk load of step {d['step']} (rank 0): {d['cold_load_s']:.2f}s, cache dropped "
            f"{d['cache_dropped']}, bit-exact {d['bit_exact']}; {ratio:.1f}x the memory recovery"
        )
    if "error" in nl:
        lines.append(f"node loss: {nl['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="steps of every throughput run")
    ap.add_argument("--time-steps", type=int, default=10, help="steps timed for the step time")
    ap.add_argument("--group", type=int, default=2, help="parity group (needs group + 1 nodes)")
    ap.add_argument("--loss-every", type=int, default=4)
    ap.add_argument("--loss-steps", type=int, default=12, help="the last snapshot's step, also durable")
    ap.add_argument("--kill-node", type=int, default=0)
    ap.add_argument("--d2h-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads per trainer")
    ap.add_argument("--budget-s", type=float, default=240, help="seconds for parts 1-2 (runs skipped)")
    ap.add_argument("--wall-s", type=float, default=540, help="every trainer is killed after this")
    ap.add_argument("--parts", default="bench,node_loss")
    ap.add_argument("--transport", default="files", choices=("files", "sockets"), help="node-loss part")
    ap.add_argument("--dir", default="/tmp/sp-protect-gpu", help="durable checkpoints (a real disk)")
    ap.add_argument("--shm", default="/dev/shm/sp-protect-gpu", help="the simulated nodes' memory roots")
    args = ap.parse_args()
    for d in (args.dir, args.shm):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    for r in range(args.nodes):
        os.makedirs(node_dir(args, r))
    args.t0 = time.time()
    config = os.path.join(args.dir, "config.json")
    with open(config, "w") as f:
        json.dump(vars(args), f)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}

    def save() -> None:
        with open(args.out + ".partial", "w") as f:
            json.dump(out, f, indent=1)

    try:
        if "bench" in args.parts:
            part_bench(args, config, out, save)
        if "node_loss" in args.parts:
            part_node_loss(args, config, out, save)
    finally:
        out["wall_s"] = time.time() - args.t0
        for pid in keepers_of(args.shm):  # keepers a failed part left behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(args.shm, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(summary(out))
    print(f"wall {out['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
