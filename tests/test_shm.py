"""Staging files in shared memory are named by their owner and reclaimed once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys

from stashpoint.engine import shm


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _touch(directory, name: str, size: int = 4096) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return path


def test_names_carry_pid_and_start_time(monkeypatch, tmp_path):
    monkeypatch.setenv("STASHPOINT_SHM_DIR", str(tmp_path))
    path = shm.shm_path("slot0")
    owner = shm.Owner.of(os.path.basename(path))
    assert os.path.dirname(path) == str(tmp_path)
    assert owner == shm.Owner(pid=os.getpid(), start=shm.process_start(os.getpid()))
    assert owner.alive()
    assert shm.Owner.of("not-ours-123-x") is None


def test_orphans_of_dead_and_recycled_pids_are_removed_live_ones_kept(tmp_path):
    me = os.getpid()
    start = shm.process_start(me)
    dead = _dead_pid()
    live = _touch(tmp_path, f"stashpoint-{me}-{start}-slot0")
    old_style_live = _touch(tmp_path, f"stashpoint-{me}-slot1")
    orphan = _touch(tmp_path, f"stashpoint-{dead}-12345-slot0", size=8192)
    old_style_orphan = _touch(tmp_path, f"stashpoint-{dead}-slot3")
    recycled = _touch(tmp_path, f"stashpoint-{me}-{start + 1}-slot2")  # same PID, other process
    other = _touch(tmp_path, "someone-elses-file")
    os.mkdir(tmp_path / f"stashpoint-{dead}-1-dir")  # not a regular file: left alone

    got = shm.reclaim_orphans(str(tmp_path))

    assert sorted(r.path for r in got) == sorted([orphan, old_style_orphan, recycled])
    assert {r.path: r.bytes for r in got}[orphan] == 8192
    for kept in (live, old_style_live, other):
        assert os.path.exists(kept)
    assert not any(os.path.exists(p) for p in (orphan, old_style_orphan, recycled))
    assert os.path.isdir(tmp_path / f"stashpoint-{dead}-1-dir")


def test_missing_directory_reclaims_nothing(tmp_path):
    assert shm.reclaim_orphans(str(tmp_path / "absent")) == []
