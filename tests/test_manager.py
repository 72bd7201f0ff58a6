"""CheckpointManager: save policy, retention, resume from the latest good checkpoint."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import stashpoint
from stashpoint.errors import InvalidOptionError
from stashpoint.manager import CheckpointManager, RetentionPolicy, SavePolicy


def _state(value: float) -> dict:
    return {"w": torch.full((64, 64), value), "step": int(value)}


def _steps(root) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("step-"))


@pytest.mark.parametrize("mode", ["sync", "eager", "lazy"])
def test_retention_keeps_last_best_and_every(tmp_path, mode):
    retention = RetentionPolicy(keep_last=2, keep_best=1, metric="loss", mode="min", keep_every=40)
    losses = {10: 5.0, 20: 1.0, 30: 4.0, 40: 3.0, 50: 6.0, 60: 7.0, 70: 8.0}
    with CheckpointManager(
        tmp_path, save_policy=SavePolicy(every_steps=10), retention=retention, mode=mode
    ) as manager:
        manager.warmup(_state(0))
        for step in range(1, 71):
            manager.maybe_save(step, _state(step), metrics={"loss": losses.get(step, 0.0)})
    # last two (60, 70), best loss (20), every 40th (40)
    assert _steps(tmp_path) == [20, 40, 60, 70]
    latest = manager.latest()
    assert latest.step == 70 and latest.metrics == {"loss": 8.0}
    lines = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "save"] == [10, 20, 30, 40, 50, 60, 70]
    assert all(r["phase_seconds"] and r["bytes_written"] > 0 for r in lines)


def test_latest_skips_incomplete_and_corrupt_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, mode="sync", retention=RetentionPolicy(keep_last=None))
    for step in (1, 2, 3, 4, 5):
        manager.save(step, _state(step))
    manager.wait()  # background retention done before we damage anything
    os.remove(tmp_path / "step-000000005" / "index.json")  # interrupted before commit
    (tmp_path / "step-000000004" / "index.json").write_text("{not json")  # corrupt index
    os.remove(tmp_path / "step-000000003" / "data-00000.safetensors")  # lost data
    with pytest.warns(UserWarning) as warned:
        latest = manager.latest()
    assert latest.step == 2
    assert len(warned) == 3 and all("skipping" in str(w.message) for w in warned)
    state = _state(0)
    with pytest.warns(UserWarning):
        info = manager.load_latest(state)
    assert info.step == 2 and state["step"] == 2 and torch.equal(state["w"], torch.full((64, 64), 2.0))


def test_empty_root_has_no_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "new", mode="sync")
    assert manager.latest() is None
    assert manager.load_latest(_state(0)) is None


def test_stale_partial_saves_are_cleaned_up(tmp_path):
    stale = tmp_path / ".step-000000001.partial-abc"
    fresh = tmp_path / ".step-000000002.partial-def"
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "data-00000.safetensors").write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    CheckpointManager(tmp_path, mode="sync", timeout_s=600)
    assert not stale.exists() and fresh.exists()  # a recent one may still be in flight


def test_seconds_policy_and_resume(tmp_path):
    manager = CheckpointManager(tmp_path, mode="sync", save_policy=SavePolicy(every_seconds=2.0))
    assert manager.maybe_save(1, _state(1)) is None
    time.sleep(2.1)
    assert manager.maybe_save(2, _state(2)) is not None
    assert manager.maybe_save(3, _state(3)) is None
    assert _steps(tmp_path) == [2]


def test_policies_validate_their_arguments():
    with pytest.raises(InvalidOptionError):
        RetentionPolicy(keep_last=0)
    with pytest.raises(InvalidOptionError):
        RetentionPolicy(keep_best=2)
    with pytest.raises(InvalidOptionError):
        SavePolicy(every_steps=0)
    with pytest.raises(InvalidOptionError):
        CheckpointManager("/tmp/x", mode="later")


def test_manager_works_on_any_storage():
    manager = CheckpointManager("memory://manager-test", mode="sync", retention=RetentionPolicy(keep_last=1))
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    manager.wait()
    assert manager.latest().step == 2 and [c.step for c in manager.checkpoints()] == [2]
    assert stashpoint.load_full(manager.latest().path, ["step"])["step"] == 2


def test_telemetry_defaults_to_local_roots_only(tmp_path, monkeypatch):
    """A root that is not a local directory must not turn into a path under the working directory."""
    pytest.importorskip("fsspec")
    monkeypatch.chdir(tmp_path)
    manager = CheckpointManager("fsspec+memory://telemetry-test/run", mode="sync")
    assert manager.telemetry_path is None
    manager.save(1, _state(1))
    manager.close()
    assert list(tmp_path.iterdir()) == [] and manager.latest().step == 1
    assert CheckpointManager(tmp_path / "local", mode="sync").telemetry_path == str(
        tmp_path / "local" / "telemetry.jsonl"
    )
