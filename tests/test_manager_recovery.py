"""CheckpointManager under damage, races and crashes: resume falls back to the previous good
checkpoint, listing survives another process committing and pruning, and retention never
leaves a half-deleted checkpoint visible."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import manager_cases
from manager_cases import flip_last_byte, state_of
from stashpoint.errors import ShapeMismatchError
from stashpoint.manager import CheckpointManager, RetentionPolicy
from stashpoint.manager.housekeeping import TOMBSTONE_TAG

TESTS = Path(__file__).parent


def _names(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def _start(function: str, *args: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    return subprocess.Popen(
        [sys.executable, str(TESTS / "manager_cases.py"), function, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _saved(root: Path, steps: list[int]) -> CheckpointManager:
    manager = CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=None))
    for step in steps:
        manager.save(step, state_of(step))
    manager.wait()  # retention done before anything is damaged
    return manager


# --- load_latest falls back on damage, and only on damage ------------------------------------


def test_flipped_byte_in_newest_falls_back_to_previous(tmp_path):
    manager = _saved(tmp_path, [1, 2, 3])
    flip_last_byte(str(tmp_path / "step-000000003" / "data-00000.safetensors"))
    state = state_of(-1)
    with pytest.warns(UserWarning, match=r"step-000000003: ChecksumMismatchError.*previous checkpoint"):
        info = manager.load_latest(state)
    assert info.step == 2 and info.name == "step-000000002"
    assert state["step"] == 2 and torch.equal(state["w"], state_of(2)["w"])


def test_every_checkpoint_damaged_loads_nothing_and_changes_nothing(tmp_path):
    manager = _saved(tmp_path, [1, 2])
    for step in (1, 2):
        flip_last_byte(str(tmp_path / f"step-00000000{step}" / "data-00000.safetensors"))
    state = state_of(-1)
    with pytest.warns(UserWarning) as warned:
        assert manager.load_latest(state) is None
    assert sum("ChecksumMismatchError" in str(w.message) for w in warned) == 2
    assert state["step"] == -1 and torch.equal(state["w"], state_of(-1)["w"])


def test_target_mismatch_is_raised_not_skipped(tmp_path):
    manager = _saved(tmp_path, [1, 2])
    state = {"w": torch.zeros(7), "step": -1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(ShapeMismatchError, match="step-000000002"):
            manager.load_latest(state)
    assert state["step"] == -1 and torch.equal(state["w"], torch.zeros(7))


def test_damage_seen_by_one_rank_makes_every_rank_fall_back(tmp_path, pools):
    """Rank 1 alone reads its per-rank tensor and sees the checksum fail; rank 0 sees only
    that rank 1 failed.  Both must agree to load the previous checkpoint."""
    root = str(tmp_path / "run")
    pools(2).run(manager_cases.save_per_rank_steps, root, [1, 2])
    flip_last_byte(os.path.join(root, "step-000000002", "data-00001.safetensors"))
    got = pools(2).run(manager_cases.load_latest_per_rank, root)
    assert [g["step"] for g in got] == [1, 1] and [g["loaded_step"] for g in got] == [1, 1]
    assert [g["w"] for g in got] == [[10.0], [11.0]]
    assert any("rank 1: ChecksumMismatchError" in w for w in got[0]["warnings"])


# --- racing another process that commits and prunes ------------------------------------------


def _race(writer: subprocess.Popen, attempt) -> int:
    """Call ``attempt()`` until the writer process has finished (at most 10 minutes)."""
    calls, deadline = 0, time.monotonic() + 600
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            attempt()
            calls += 1
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    return calls


def test_latest_never_reports_none_while_another_process_commits_and_prunes(tmp_path):
    """Another process commits step after step and prunes the one before.  Uncommitted
    leftovers listed first make each scan slow, so commits and deletions land between
    a scan's listing and its reads: it must list again instead of finding nothing."""
    _saved(tmp_path, [1000]).close()
    for i in range(1, 300):
        (tmp_path / f"step-{i:09d}").mkdir()  # no index: skipped (with a warning) by every scan
    reader = CheckpointManager(tmp_path, mode="sync", retention=RetentionPolicy(keep_last=None))
    missing: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = _race(
            _start("commit_and_prune", tmp_path, 60, 1001, 64),
            lambda: missing.append(reader.latest() is None),
        )
        assert reader.latest().step == 1060 and calls >= 10, calls
    assert sum(missing) == 0, f"latest() found nothing {sum(missing)} times in {calls} calls"
    print(f"latest() found a checkpoint in all {calls} calls")


def test_load_latest_retries_when_its_checkpoint_is_deleted_under_it(tmp_path):
    """Another process commits and prunes while this one resumes again and again.  Uncommitted
    leftovers listed after the real checkpoints make each scan slow, and the load reads many
    chunks, so the checkpoint it picks is often deleted before or while the load reads it: the
    load must move on to another, never fail or load a mix."""
    numel, parts = 1 << 14, 32  # a chunk per read: the load opens the file 32 times
    manager = CheckpointManager(tmp_path, mode="sync", retention=RetentionPolicy(keep_last=None))
    manager.save(0, state_of(0, numel, parts))
    manager.close()
    for i in range(1, 300):
        (tmp_path / f"step-{900_000_000 + i:09d}").mkdir()  # no index: never a candidate

    def load() -> None:
        state = state_of(-1, numel, parts)
        info = manager.load_latest(state)
        assert info is not None
        # what was loaded is whole and is the checkpoint reported
        expected = state_of(info.step, numel, parts)
        assert state["step"] == info.step
        assert all(torch.equal(state[k], expected[k]) for k in expected if k != "step")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loads = _race(_start("commit_and_prune", tmp_path, 60, 1, numel, parts), load)
    retried = [w for w in caught if "not resuming" in str(w.message)]
    assert loads >= 10, loads
    print(f"{loads} loads, {len(retried)} retried after their checkpoint was deleted")


# --- retention deletes safely ----------------------------------------------------------------


def test_retention_deletes_the_directories_it_listed(tmp_path):
    """A copy of a checkpoint under another name records the original's step in its index:
    retention must delete the copy itself, not the original's name twice."""
    _saved(tmp_path, [1, 2, 3]).close()
    shutil.copytree(tmp_path / "step-000000001", tmp_path / "step-000000004")
    manager = CheckpointManager(tmp_path, mode="sync", retention=RetentionPolicy(keep_last=2))
    manager.save(5, state_of(5))
    manager.close()
    assert [n for n in _names(tmp_path) if n.startswith("step-")] == ["step-000000003", "step-000000005"]


def test_sigkill_in_the_middle_of_a_deletion_leaves_nothing_visible(tmp_path):
    """Retention deletes a checkpoint of many files; the process is killed once it started.
    No half-deleted ``step-N`` may be left, and the next manager starts clean and quiet."""
    _saved(tmp_path, [1]).close()
    big = tmp_path / "step-000000001"
    for i in range(5_000):  # readers ignore files the index does not name; they make rmtree slow
        (big / f".extra-{i:05d}").write_bytes(b"x")
    victim = _start("save_and_prune", tmp_path, 2)
    deadline = time.monotonic() + 120
    tombstones: list[str] = []
    try:
        while not tombstones and victim.poll() is None and time.monotonic() < deadline:
            tombstones = [n for n in _names(tmp_path) if TOMBSTONE_TAG in n]
            time.sleep(0.0005)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    assert tombstones, f"no tombstone appeared before the process ended: {_names(tmp_path)}"
    left = _names(tmp_path)
    assert "step-000000001" not in left and "step-000000002" in left
    half_deleted = [n for n in left if TOMBSTONE_TAG in n]
    print(f"killed mid-delete: {len(half_deleted)} tombstone(s) left")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip, nothing to warn about
        manager = CheckpointManager(tmp_path, mode="sync")
        assert [c.step for c in manager.checkpoints()] == [2]
    assert not [n for n in _names(tmp_path) if n.startswith(".")]
