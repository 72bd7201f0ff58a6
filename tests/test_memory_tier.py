"""The memory tier: snapshots that survive the trainer, verified recovery, breakpoint and preemption.

Every test runs real trainer processes (gloo process groups, real signals and SIGKILLs)
and real keeper processes, each test in its own shared-memory root.
"""

from __future__ import annotations

import os
import queue
import signal
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import memtier_cases
from stashpoint import CheckpointManager
from stashpoint.engine import memtier
from stashpoint.engine.load import load_state
from stashpoint.engine.verify import verify_checkpoint
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import SavePolicy

CTX = mp.get_context("spawn")


def _launch(fn, world: int, *args) -> tuple[list, object]:
    init_file = tempfile.mktemp(prefix="stashpoint-mem-rdzv-")
    results = CTX.Queue()
    procs = [CTX.Process(target=fn, args=(r, world, init_file, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    return procs, results


def _collect(procs, results, timeout: float = 240) -> dict:
    """Every rank's report.  When a rank dies, the others are SIGKILLed, as torchrun's agent
    does before it restarts the workers (they may be blocked in a training collective)."""
    got: dict = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        try:
            rank, kind, payload = results.get(timeout=0.5)
        except queue.Empty:
            continue
        got[rank] = (kind, payload)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
    return got


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _shm_empty(shm: str) -> bool:
    return not [n for n in os.listdir(shm) if n.startswith("stashpoint-mem-")]


@pytest.fixture
def shm(tmp_path):
    d = tmp_path / "shm"
    d.mkdir()
    return str(d)


def test_sigkill_of_a_rank_restores_from_memory_and_matches_the_uninterrupted_run(tmp_path, shm):
    steps, world = 8, 2
    os.makedirs(tmp_path / "ref-shm")
    ref_procs, ref_q = _launch(
        memtier_cases.train_job, world, str(tmp_path / "ref"), str(tmp_path / "ref-shm"), steps, 4, None
    )
    ref = _collect(ref_procs, ref_q)
    assert all(kind == "done" for kind, _ in ref.values()), ref

    durable = str(tmp_path / "ckpt")
    procs, q = _launch(memtier_cases.train_job, world, durable, shm, steps, 4, 6)
    first = _collect(procs, q)
    assert procs[1].exitcode == -signal.SIGKILL and 1 not in first
    assert os.listdir(shm), "the snapshots must outlive the trainers"

    # the restarted job: same world, reattaches to the keepers and resumes from memory
    procs, q = _launch(memtier_cases.train_job, world, durable, shm, steps, 4, None)
    second = _collect(procs, q)
    for rank in range(world):
        kind, out = second[rank]
        assert kind == "done", second
        tier, step, _seconds = out["resumed"]
        assert (tier, step) == ("memory", 6), out["resumed"]  # newer than the durable step 4
        for s, loss in out["losses"].items():
            assert loss == ref[rank][1]["losses"][s], (rank, s)
        assert out["digest"] == ref[rank][1]["digest"]
    _wait_for(lambda: _shm_empty(shm), 30, "the memory tier to be freed after the normal exit")


def test_memory_snapshot_reshards_to_a_smaller_world(tmp_path, shm):
    steps, durable = 6, str(tmp_path / "ckpt")
    procs, q = _launch(memtier_cases.train_job, 2, durable, shm, steps, 100, 4)
    _collect(procs, q)
    os.makedirs(tmp_path / "ref-shm")
    ref_procs, ref_q = _launch(
        memtier_cases.train_job, 1, str(tmp_path / "ref"), str(tmp_path / "ref-shm"), steps, 100, None
    )
    ref = _collect(ref_procs, ref_q)
    procs, q = _launch(memtier_cases.train_job, 1, durable, shm, steps, 100, None)
    got = _collect(procs, q)
    kind, out = got[0]
    assert kind == "done", got
    assert out["resumed"][:2] == ("memory", 4)
    # the state after resharding 2 -> 1 ranks is the one the 2-rank run had: the rest of
    # the run matches a 1-rank run that restored the same state (losses to float tolerance,
    # since the global batch is summed in another order)
    for s in range(4, steps):
        assert out["losses"][s] == pytest.approx(ref[0][1]["losses"][s], rel=1e-4)
    # the keeper of the rank that is gone was retired
    _wait_for(lambda: _shm_empty(shm), 30, "the memory tier to be freed")


def test_kill_during_a_snapshot_copy_never_exposes_a_partial_snapshot(tmp_path, shm):
    root = memtier.memory_root("midcopy", shm)
    p = CTX.Process(target=memtier_cases.kill_mid_copy, args=(root, shm))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    snaps = memtier.complete_snapshots(root)
    assert [s.step for s in snaps] == [1]  # step 2 was never sealed
    view = memtier.open_view(root, snaps[0], "t")
    try:
        state = {"w": torch.zeros(4096), "loader": {"step": 0}}
        load_state(state, view)
    finally:
        memtier.close_view(view)
    assert torch.equal(state["w"], torch.arange(4096, dtype=torch.float32)) and state["loader"]["step"] == 1
    _wait_for(lambda: not os.path.exists(root), 30, "the keeper to free the memory after its idle timeout")


def _run_to_completion_keeping_memory(durable: str, steps: int) -> dict:
    model, optim = memtier_cases._model(1)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, if_busy="wait", reattach_s=60, signal=None)
    mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=2))
    for step in range(steps):
        memtier_cases.train_step(model, optim, memtier_cases.CFG, step, 12, 0, 1)
        state["loader"]["step"] = step + 1
        mgr.maybe_save(step + 1, state)
    mgr.wait()
    root = mgr.memory_root
    mgr.close(release_memory=False)  # as a crash would: the keeper keeps the snapshots
    return {"root": root, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _flip_a_byte(root: str, step: int) -> None:
    snap = next(s for s in memtier.complete_snapshots(root) if s.step == step)
    m = snap.manifests[0]
    path = memtier.slot_data(root, 0, m.slot)
    rec = next(r for r in m.records if hasattr(r, "record") and r.record.nbytes > 64)
    with open(path, "r+b") as f:
        f.seek(rec.record.byte_range[0] + 17)
        b = f.read(1)
        f.seek(rec.record.byte_range[0] + 17)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_bit_flip_in_memory_falls_back_to_the_next_candidate_then_durable(tmp_path, shm, monkeypatch):
    monkeypatch.setenv("STASHPOINT_SHM_DIR", shm)
    durable = str(tmp_path / "ckpt")
    run = _run_to_completion_keeping_memory(durable, 5)  # memory: 4, 5; durable: 2, 4
    _flip_a_byte(run["root"], 5)
    model, optim = memtier_cases._model(1)
    state = {"model": model, "optim": optim, "loader": {"step": 0}}
    policy = MemoryPolicy(every_steps=1, reattach_s=60, signal=None)
    with pytest.warns(UserWarning, match="memory snapshot of step 5.*ChecksumMismatch"):
        mgr = CheckpointManager(durable, memory=policy, save_policy=SavePolicy(every_steps=2))
        info = mgr.load_latest(state)
    assert (info.tier, info.step) == ("memory", 4)
    _flip_a_byte(run["root"], 4)
    with pytest.warns(UserWarning, match="memory snapshot of step 4"):
        info = mgr.load_latest(state)
    assert (info.tier, info.step) == ("local", 4)  # the durable tier
    mgr.close()
    _wait_for(lambda: _shm_empty(shm), 30, "the memory tier to be freed")


def test_persist_at_breakpoint_yields_a_verifiable_checkpoint_and_frees_memory(tmp_path, shm):
    durable = str(tmp_path / "ckpt")
    p = CTX.Process(target=memtier_cases.snapshot_then_die, args=(durable, shm, 3))
    p.start()
    p.join(180)
    assert p.exitcode == -signal.SIGKILL
    index = os.path.join(durable, "step-000000003", "index.json")
    _wait_for(lambda: os.path.exists(index), 180, "the keeper to persist the newest snapshot")
    report = verify_checkpoint(os.path.dirname(index))
    assert report.ok, report
    _wait_for(lambda: _shm_empty(shm), 30, "the keeper to free its memory")


def test_preemption_signal_to_one_rank_stops_every_rank_after_persisting(tmp_path, shm):
    durable = str(tmp_path / "ckpt")
    procs, q = _launch(memtier_cases.preempted_job, 2, durable, shm)
    stopped: dict = {}
    signalled = False
    deadline = time.monotonic() + 240
    while len(stopped) < 2 and time.monotonic() < deadline:
        rank, kind, step = q.get(timeout=120)
        if kind == "step" and step >= 2 and not signalled:
            os.kill(procs[1].pid, signal.SIGTERM)
            signalled = True
        if kind == "stopped":
            stopped[rank] = step
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert stopped[0] == stopped[1]
    ckpt = os.path.join(durable, f"step-{stopped[0]:09d}")
    assert verify_checkpoint(ckpt).ok
    _wait_for(lambda: _shm_empty(shm), 30, "the memory tier to be freed")


def test_keeper_persists_on_its_own_when_the_trainer_misses_the_grace_period(tmp_path, shm):
    durable = str(tmp_path / "ckpt")
    results = CTX.Queue()
    p = CTX.Process(target=memtier_cases.stuck_after_signal, args=(durable, shm, results))
    p.start()
    kind, _root = results.get(timeout=180)
    assert kind == "ready"
    os.kill(p.pid, signal.SIGUSR1)
    index = os.path.join(durable, "step-000000003", "index.json")
    _wait_for(lambda: os.path.exists(index), 180, "the keeper to persist after the grace period")
    assert verify_checkpoint(os.path.dirname(index)).ok
    p.kill()
    p.join()
    _wait_for(lambda: _shm_empty(shm), 30, "the keeper to free its memory once its trainer is gone")


def test_tensors_of_mixed_element_sizes_snapshot_and_restore_exactly(tmp_path, shm):
    """A 7-byte tensor before float64 and bfloat16 ones: the slot still views each tensor
    at an offset its element size divides (a snapshot used to fail to stage them)."""
    policy = MemoryPolicy(every_steps=1, slots=2, signal=None, shm_dir=shm)

    def state(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {
            "odd": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
            "wide": torch.randn(5, dtype=torch.float64, generator=g),
            "half": torch.randn(3, generator=g).to(torch.bfloat16),
            "f": torch.randn(6, generator=g),
        }

    mgr = CheckpointManager(str(tmp_path / "ckpt"), memory=policy, save_policy=SavePolicy(every_steps=10**9))
    saved = state(0)
    mgr.maybe_save(1, saved).wait(60)
    mgr.close(release_memory=False)
    target = state(1)
    mgr = CheckpointManager(str(tmp_path / "ckpt"), memory=policy, save_policy=SavePolicy(every_steps=10**9))
    info = mgr.load_latest(target)
    mgr.close()
    assert info.tier == "memory" and info.step == 1
    assert all(torch.equal(target[k], saved[k]) for k in saved)
