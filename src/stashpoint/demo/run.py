"""``stashpoint demo``: train with FSDP2 on CPU ranks, lose a rank, recover from memory, reshard.

1. A reference run of ``steps`` AdamW steps on ``save_world`` ranks, without checkpoints.
2. The same job with the checkpoint manager: a memory snapshot every step (held by a
   keeper process per rank, which outlives its trainer) and a durable checkpoint every
   ``save_at`` steps.  The last rank is SIGKILLed mid-run, after the snapshot of step
   ``kill_at``; the other ranks are killed as torchrun's agent would.
3. The job restarts on ``save_world`` ranks: the ranks agree on the newest snapshot
   every rank holds, verify it by checksum and load it from shared memory; training
   finishes and its losses equal the reference run's exactly.
4. A job on ``resume_world`` ranks resumes from the durable checkpoint of step
   ``save_at`` (every parameter and Adam moment resharded) and trains to the end.
"""

from __future__ import annotations

import os
import shutil
import time

from stashpoint.demo import jobs
from stashpoint.demo.launch import run_ranks, run_until_a_rank_dies
from stashpoint.errors import InvalidOptionError
from stashpoint.textfmt import human_bytes, table

TOLERANCE = 1e-5


def _loss_table(reference: list[float], runs: dict[str, dict[int, float]]) -> tuple[str, float]:
    """The loss of every step of each run next to the reference, and the worst difference."""
    steps = sorted({s for losses in runs.values() for s in losses})
    rows, worst = [], 0.0
    for s in steps:
        row = [str(s + 1), f"{reference[s]:.6f}"]
        for losses in runs.values():
            if s in losses:
                worst = max(worst, abs(losses[s] - reference[s]))
                row.append(f"{losses[s]:.6f}")
            else:
                row.append("")
        rows.append(row)
    return table(["step", "reference", *runs], rows, set(range(len(runs) + 2))), worst


def run(out_dir: str, steps: int, save_at: int, save_world: int, resume_world: int) -> int:
    if not 0 < save_at < steps:
        raise InvalidOptionError(f"save_at must be between 0 and the step count ({steps}), not {save_at}")
    root = os.path.abspath(os.path.join(out_dir, "run"))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    kill_at = min(steps, save_at + max(1, (steps - save_at) // 2))

    t = [time.perf_counter()]
    print(f"[1/4] reference: {steps} steps on {save_world} ranks (FSDP2, gloo), no checkpoints")
    reference = run_ranks(save_world, jobs.reference, steps)[0]
    t.append(time.perf_counter())
    print(
        f"[2/4] the same job with a memory snapshot every step and a durable checkpoint every "
        f"{save_at} steps; rank {save_world - 1} is SIGKILLed after step {kill_at}"
    )
    codes = run_until_a_rank_dies(save_world, jobs.resilient, steps, root, save_at, kill_at)
    t.append(time.perf_counter())
    print(f"      exit codes {codes}: the snapshots stay with their keeper processes")
    print(f"[3/4] restart on {save_world} ranks: recover, verify, finish")
    restarted = run_ranks(save_world, jobs.resilient, steps, root, save_at, None)
    t.append(time.perf_counter())
    resumed = restarted[0]["resumed"]
    print(
        f"      resumed from the {resumed['tier']} tier at step {resumed['step']} in "
        f"{resumed['s'] * 1e3:.0f} ms (every rank: "
        + ", ".join(f"r{r}: {x['resumed']['tier']}" for r, x in enumerate(restarted))
        + ")"
    )
    durable = os.path.join(root, f"step-{save_at:09d}")
    print(f"[4/4] resume on {resume_world} ranks from the durable checkpoint {durable}")
    elsewhere = run_ranks(resume_world, jobs.resume_elsewhere, steps, durable)
    t.append(time.perf_counter())
    other = dict(zip(range(elsewhere[0]["start"], steps), elsewhere[0]["losses"]))
    text, _ = _loss_table(
        reference, {"after SIGKILL": restarted[0]["losses"], f"@{resume_world} ranks": other}
    )
    print()
    print(text)
    exact = all(loss == reference[s] for s, loss in restarted[0]["losses"].items())
    worst = max((abs(loss - reference[s]) for s, loss in other.items()), default=0.0)
    loaded = elsewhere[0]["loaded"]
    summary = [
        ["killed", f"rank {save_world - 1} after step {kill_at} (exit codes {codes})"],
        ["recovered", f"step {resumed['step']} from {resumed['tier']} in {resumed['s'] * 1e3:.0f} ms"],
        ["after recovery", "losses identical to the reference" if exact else "MISMATCH"],
        [
            "resharded",
            f"{save_world} -> {resume_world} ranks from step {save_at}, "
            f"{human_bytes(loaded.bytes_read)} read by rank 0",
        ],
        ["max |loss diff| resharded", f"{worst:.2e} (tolerance {TOLERANCE:g})"],
        [
            "wall time",
            ", ".join(
                f"{n} {b - a:.1f} s"
                for n, a, b in zip(["reference", "crashed job", "restart", "reshard"], t, t[1:])
            ),
        ],
    ]
    print()
    print(table(["summary", ""], summary))
    ok = exact and resumed["tier"] == "memory" and worst <= TOLERANCE and elsewhere[0]["start"] == save_at
    print()
    print("recovered from memory and matched the uninterrupted run" if ok else "MISMATCH")
    print(f"try: stashpoint inspect {durable}")
    return 0 if ok else 1
