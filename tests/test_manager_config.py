"""CheckpointManager options: one validated ManagerConfig, the keyword spelling of the README,
named errors for bad values, and the public SaveHandle callback the manager relies on."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import stashpoint
from stashpoint.errors import InvalidOptionError
from stashpoint.manager import CheckpointManager, ManagerConfig, RetentionPolicy, SavePolicy, UploadPolicy


def test_readme_call_builds_the_same_config_as_a_manager_config(tmp_path):
    save_policy = SavePolicy(every_steps=500, every_seconds=1800)
    retention = RetentionPolicy(keep_last=3, keep_best=2, metric="val_loss", keep_every=10_000)
    manager = CheckpointManager(tmp_path, save_policy=save_policy, retention=retention, mode="sync")
    config = ManagerConfig(save_policy=save_policy, retention=retention, mode="sync")
    assert manager.config == config
    assert CheckpointManager(tmp_path, config).config == config
    assert (manager.save_policy, manager.retention, manager.mode) == (save_policy, retention, "sync")


def test_keywords_replace_fields_of_a_given_config(tmp_path):
    base = ManagerConfig(mode="sync", timeout_s=30.0)
    manager = CheckpointManager(tmp_path, base, retention=RetentionPolicy(keep_last=1))
    assert manager.config == dataclasses.replace(base, retention=RetentionPolicy(keep_last=1))
    assert manager.timeout_s == 30.0 and base.retention == RetentionPolicy()


def test_upload_to_and_keep_local_are_a_shorter_upload_policy(tmp_path):
    remote = str(tmp_path / "remote")
    manager = CheckpointManager(tmp_path / "local", mode="sync", upload_to=remote, keep_local=1)
    assert manager.config.upload == UploadPolicy(remote=remote, keep_local=1)
    policy = UploadPolicy(remote=remote, part_bytes=1 << 20)
    assert ManagerConfig(upload=policy).upload is policy
    with pytest.raises(InvalidOptionError, match="remote tier once"):
        CheckpointManager(tmp_path / "local", mode="sync", upload=policy, upload_to=remote)
    with pytest.raises(InvalidOptionError, match="keep_local=2 needs upload_to"):
        CheckpointManager(tmp_path / "local", mode="sync", keep_local=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "later"}, "mode must be one of 'eager', 'lazy', 'sync', not 'later'"),
        ({"if_busy": "drop"}, "if_busy must be one of 'wait', 'skip'"),
        ({"timeout_s": 0}, "timeout_s must be a positive number"),
        ({"timeout_s": "10"}, "timeout_s must be a positive number"),
        ({"stale_after_s": -1}, "stale_after_s must be 0 or more"),
        ({"device_buffer": "yes"}, "device_buffer must be a bool"),
        ({"retention": 3}, "retention must be a RetentionPolicy"),
        ({"save_policy": {"every_steps": 10}}, "save_policy must be a SavePolicy"),
        ({"keep_evry": 3}, "no option 'keep_evry'"),
    ],
)
def test_bad_options_raise_a_named_error_before_anything_starts(tmp_path, options, message):
    root = tmp_path / "never"
    with pytest.raises(InvalidOptionError, match=message):
        CheckpointManager(root, **options)
    assert not root.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SavePolicy(every_steps=0), "every_steps must be a positive integer"),
        (lambda: SavePolicy(every_steps=2.5), "every_steps must be a positive integer"),
        (lambda: SavePolicy(every_seconds=-1), "every_seconds must be a positive number"),
        (lambda: RetentionPolicy(keep_last=0), "keep_last must be a positive integer"),
        (lambda: RetentionPolicy(keep_best=2), "keep_best=2 needs a metric name"),
        (lambda: RetentionPolicy(keep_best=-1, metric="loss"), "keep_best must be a positive integer"),
        (lambda: RetentionPolicy(metric="loss", mode="median"), "mode must be one of 'min', 'max'"),
        (lambda: RetentionPolicy(keep_every=True), "keep_every must be a positive integer"),
    ],
)
def test_policies_raise_a_named_error(make, message):
    with pytest.raises(InvalidOptionError, match=message):
        make()


def test_configs_are_frozen_and_keyword_only():
    config = ManagerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "sync"
    with pytest.raises(TypeError):
        SavePolicy(500)
    with pytest.raises(TypeError):
        RetentionPolicy(3)
    assert config.save_policy == SavePolicy(every_steps=1000) and config.stale_s == config.timeout_s


def test_save_handle_calls_back_once_committed(tmp_path):
    called: list[object] = []
    done = threading.Event()

    def committed(handle) -> None:
        called.append(handle)
        done.set()

    handle = stashpoint.async_save({"w": torch.ones(1024)}, tmp_path / "a", mode="eager")
    handle.add_done_callback(committed)
    assert done.wait(120) and handle.wait(120) is not None
    assert called == [handle] and handle.exception() is None
    handle.add_done_callback(called.append)  # already committed: called at once
    assert called == [handle, handle]
