"""Tiering with the real S3 server as the remote tier (a local directory as the fast one)."""

from __future__ import annotations

import os

import pytest
import torch

from stashpoint.errors import UploadError
from stashpoint.manager import CheckpointManager, RetentionPolicy, UploadPolicy
from stashpoint.storage import LocalStorage, resolve


def _state(value: float) -> dict:
    return {"w": torch.full((512, 512), value), "step": int(value)}


def _remote_steps(url: str) -> list[int]:
    storage, root = resolve(url)
    return sorted(
        int(n.split("-")[1])
        for n in storage.list(root)
        if n.startswith("step-") and storage.exists(storage.join(root, n, "index.json"))
    )


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_tiering_to_s3(s3_server, tmp_path, mode):
    local, remote = tmp_path / "fast", s3_server.url("remote")
    # small parts: the 1 MiB data files go up as multipart uploads through the reused buffer
    policy = UploadPolicy(remote=remote, keep_local=1, part_bytes=256 << 10)
    with CheckpointManager(
        local, mode=mode, retention=RetentionPolicy(keep_last=2), upload_to=policy
    ) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, _state(step))
    assert _remote_steps(remote) == [3, 4]
    assert sorted(os.listdir(local)) == ["step-000000004", "telemetry.jsonl"]
    LocalStorage().delete(str(local / "step-000000004"))
    again = CheckpointManager(local, mode="sync", upload_to=remote, keep_local=1)
    latest = again.latest()
    assert latest.step == 4 and latest.tier == "remote" and latest.path.startswith("s3://")
    state = _state(0)
    assert again.load_latest(state).step == 4 and torch.equal(state["w"], torch.full((512, 512), 4.0))
    again.close()


def test_unreachable_s3_tier_is_reported_and_training_goes_on(s3_server, tmp_path):
    dead = f"s3://{s3_server.bucket}/x?endpoint=http://127.0.0.1:9&max_attempts=1&connect_timeout=1"
    with pytest.warns(UserWarning):
        manager = CheckpointManager(tmp_path, mode="sync", upload_to=dead)
        manager.save(1, _state(1))
        with pytest.raises(UploadError):
            manager.wait()
        latest = manager.latest()
    assert latest.step == 1 and latest.tier == "local"
    assert [f.step for f in manager.upload_failures] == [1]
    manager.close()
