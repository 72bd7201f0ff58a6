"""Tiered checkpoints: a fast local root, uploads to a second tier in the background.

The remote tier here is a second local directory (through the fault-injecting
``faulty://`` backend where a test needs failures), so the logic is tested wherever
the S3 server is not available; tests/test_tiering_s3.py repeats the core on S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import stashpoint
from stashpoint.errors import UploadError
from stashpoint.manager import CheckpointManager, RetentionPolicy, SavePolicy, UploadPolicy


def _state(value: float) -> dict:
    return {"w": torch.full((128, 64), value), "b": torch.arange(5.0) + value, "step": int(value)}


def _steps(root) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("step-"))


def _committed(root) -> list[int]:
    return [s for s in _steps(root) if os.path.exists(os.path.join(root, f"step-{s:09d}", "index.json"))]


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_uploads_every_checkpoint_and_keeps_k_locally(tmp_path, mode):
    local, remote = tmp_path / "fast", tmp_path / "remote"
    with CheckpointManager(
        local,
        mode=mode,
        save_policy=SavePolicy(every_steps=10),
        retention=RetentionPolicy(keep_last=3),
        upload_to=str(remote),
        keep_local=2,
    ) as manager:
        for step in range(1, 61):
            manager.maybe_save(step, _state(step))
    assert _steps(local) == [50, 60]
    assert _committed(remote) == [40, 50, 60] and _steps(remote) == [40, 50, 60]
    assert not [n for n in os.listdir(remote) if n.startswith(".")]  # no staging left
    for step in (50, 60):  # the remote copy is the same checkpoint, byte for byte
        for name in os.listdir(local / f"step-{step:09d}"):
            a = (local / f"step-{step:09d}" / name).read_bytes()
            assert a == (remote / f"step-{step:09d}" / name).read_bytes(), name
    latest = manager.latest()
    assert latest.step == 60 and latest.tier == "local"
    assert [(c.step, c.tier) for c in manager.checkpoints()] == [(40, "remote"), (50, "local"), (60, "local")]
    assert manager.upload_failures == []


def test_latest_and_load_come_from_the_remote_tier_once_local_copies_are_gone(tmp_path):
    local, remote = tmp_path / "fast", tmp_path / "remote"
    manager = CheckpointManager(local, mode="sync", upload_to=str(remote), keep_local=1)
    for step in (1, 2, 3):
        manager.save(step, _state(step))
    manager.close()
    for step in _steps(local):  # the node lost its disk
        stashpoint.storage.LocalStorage().delete(str(local / f"step-{step:09d}"))
    again = CheckpointManager(local, mode="sync", upload_to=str(remote), keep_local=1)
    latest = again.latest()
    assert latest.step == 3 and latest.tier == "remote" and latest.path.startswith(str(remote))
    state = _state(0)
    assert again.load_latest(state).step == 3
    assert torch.equal(state["w"], torch.full((128, 64), 3.0)) and state["step"] == 3
    again.close()


def test_a_failed_upload_is_reported_and_damages_neither_tier(tmp_path):
    local, remote = tmp_path / "fast", tmp_path / "remote"
    # the remote tier's disk fills up after 1000 bytes of a data file
    manager = CheckpointManager(local, mode="sync", upload_to=f"faulty://enospc-1000{remote}", keep_local=0)
    with pytest.warns(UserWarning, match="No space left"):
        manager.save(1, _state(1))
        with pytest.raises(UploadError, match="step.s. 1") as raised:
            manager.wait()
    assert isinstance(raised.value.__cause__, OSError)
    assert [f.step for f in manager.upload_failures] == [1]
    assert os.listdir(remote) == []  # nothing committed, no staging left behind
    # the only copy stays local although keep_local=0, and it is whole
    assert _committed(local) == [1]
    assert manager.latest().tier == "local"
    assert torch.equal(stashpoint.load_full(manager.latest().path, ["w"])["w"], torch.full((128, 64), 1.0))
    manager.wait()  # a failure is raised once


def test_a_killed_upload_commits_nothing_and_the_next_start_uploads_again(tmp_path):
    local, remote = tmp_path / "fast", tmp_path / "remote"
    child = textwrap.dedent(
        f"""
        import time, torch
        from stashpoint.manager import CheckpointManager, UploadPolicy
        # 300 ms per 64 KiB part: the 1 MiB data file takes about 5 s to upload
        policy = UploadPolicy(remote="faulty://slow-300{remote}", part_bytes=64 << 10)
        manager = CheckpointManager({str(local)!r}, mode="sync", upload_to=policy)
        manager.save(1, {{"w": torch.randn(256, 1024)}})
        print("saved", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the upload has started: a staging dir with data
            staging = [n for n in os.listdir(remote) if ".partial-" in n] if remote.exists() else []
            if staging and os.listdir(remote / staging[0]):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the upload never started")
    finally:
        proc.kill()
        proc.wait(30)
    assert _committed(remote) == [] and _steps(remote) == []
    assert _committed(local) == [1]
    # the next run cleans the interrupted upload and uploads the checkpoint again
    with CheckpointManager(local, mode="sync", upload_to=str(remote), stale_after_s=0) as again:
        pass
    assert os.listdir(remote) == ["step-000000001"] and _committed(remote) == [1]
    got = stashpoint.load_full(str(remote / "step-000000001"))
    assert torch.equal(got["w"], stashpoint.load_full(str(local / "step-000000001"))["w"])
    assert again.upload_failures == []


def test_remote_retention_follows_the_policy_and_local_keeps_unuploaded_copies(tmp_path):
    local, remote = tmp_path / "fast", tmp_path / "remote"
    retention = RetentionPolicy(keep_last=2, keep_best=1, metric="loss")
    losses = {1: 0.5, 2: 3.0, 3: 2.0, 4: 1.0}
    with CheckpointManager(
        local, mode="sync", retention=retention, upload_to=str(remote), keep_local=1
    ) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, _state(step), metrics={"loss": losses[step]})
    assert _committed(remote) == [1, 3, 4]  # best loss (1) and the last two
    assert _steps(local) == [4]
    # while the remote tier is down, local copies the policy wants stay local
    broken = f"faulty://enospc-0{tmp_path / 'down'}"
    with pytest.warns(UserWarning):
        manager = CheckpointManager(local, mode="sync", retention=retention, upload_to=broken, keep_local=1)
        for step in (5, 6):
            manager.save(step, _state(step), metrics={"loss": 9.0})
        with pytest.raises(UploadError):
            manager.wait()
    assert _steps(local) == [4, 5, 6]  # 4 was not uploaded to this tier either: kept while wanted
    manager.close()


def test_upload_policy_is_validated():
    with pytest.raises(ValueError):
        UploadPolicy(remote="")
    with pytest.raises(ValueError):
        UploadPolicy(remote="/x", keep_local=-1)
    with pytest.raises(ValueError):
        UploadPolicy(remote="/x", part_bytes=10)
    with pytest.raises(ValueError):
        CheckpointManager("/tmp/x-never", mode="sync", keep_local=2)  # keep_local needs a remote tier
    policy = UploadPolicy(remote="s3://b/p")
    assert policy.keep_local == 2
    with pytest.raises(AttributeError):
        policy.keep_local = 3  # frozen
