"""Staging files in shared memory are named by their owner and reclaimed once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stashpoint.engine import shm
from stashpoint.engine.staging_pool import buffer_size


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


_KILLED_WRITER = """
import os, signal, sys, time
import torch
import stashpoint
from stashpoint.engine.writer_client import BackgroundWriter

root = sys.argv[1]
state = {"w": torch.arange(1 << 16, dtype=torch.float32)}
stashpoint.async_save(state, os.path.join(root, "a"), mode="eager").wait(timeout=120)
first = BackgroundWriter.get().proc
shm = os.environ["STASHPOINT_SHM_DIR"]
orphans = [n for n in os.listdir(shm) if n.startswith(f"stashpoint-{first.pid}-")]
os.kill(first.pid, signal.SIGKILL)
first.wait(timeout=60)
left = [n for n in orphans if os.path.exists(os.path.join(os.environ["STASHPOINT_SHM_DIR"], n))]
stashpoint.async_save(state, os.path.join(root, "b"), mode="eager").wait(timeout=120)
after = [n for n in orphans if os.path.exists(os.path.join(os.environ["STASHPOINT_SHM_DIR"], n))]
print(len(orphans), len(left), len(after))
"""


def _run(script: str, root, shm_dir) -> str:
    """``script`` in a fresh interpreter (its own writer process) with staging in ``shm_dir``."""
    env = dict(os.environ, STASHPOINT_SHM_DIR=str(shm_dir))
    out = subprocess.run(
        [sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_killed_writers_staging_is_reclaimed_by_the_next_writer(tmp_path):
    """SIGKILL leaves the writer's staging file behind; the writer started next removes it."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    staged, left_after_kill, left_after_restart = map(int, _run(_KILLED_WRITER, tmp_path, shm_dir).split())
    assert staged >= 1 and left_after_kill == staged and left_after_restart == 0


_SMALL_SAVE = """
import os, sys
import torch
import stashpoint

stashpoint.async_save({"w": torch.ones(1)}, os.path.join(sys.argv[1], "c"), mode="eager").wait(timeout=120)
shm = os.environ["STASHPOINT_SHM_DIR"]
print(sorted(os.path.getsize(os.path.join(shm, n)) for n in os.listdir(shm)))
"""


def test_staging_slack_is_proportional():
    assert buffer_size(4) == 4096  # one element: a page, not 64 MiB more
    assert buffer_size(8 << 20) == (9 << 20)
    assert buffer_size(10 << 30) == (10 << 30) + (64 << 20)


def test_a_small_async_save_fits_dockers_default_shm(tmp_path):
    """Docker gives containers 64 MiB of /dev/shm: a small state's staging must fit in it."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(shm_dir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        sizes = [int(n) for n in _run(_SMALL_SAVE, tmp_path, shm_dir).strip().strip("[]").split(",")]
        assert len(sizes) == 1 and sizes[0] <= 64 << 10  # pages, where 64 MiB of slack used to be
    finally:
        subprocess.run(["umount", "-l", str(shm_dir)], check=False)


_STOPPED_WRITER = """
import os, signal, sys, time, warnings
import torch
import stashpoint
from stashpoint.engine.writer_client import BackgroundWriter

stashpoint.async_save({"w": torch.ones(4)}, os.path.join(sys.argv[1], "c"), mode="eager").wait(timeout=120)
writer = BackgroundWriter.get()
os.kill(writer.proc.pid, signal.SIGSTOP)  # a writer that cannot finish: the wait must end anyway
t0 = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    writer.shutdown(timeout_s=0.5)
waited = time.monotonic() - t0
os.kill(writer.proc.pid, signal.SIGCONT)
writer.proc.wait(timeout=60)  # resumed, it still exits on the shutdown it was sent
print(f"{waited:.2f}", len(caught), "still persisting" in str(caught[0].message), writer.proc.returncode)
"""


def test_the_exit_wait_for_the_writer_is_bounded(tmp_path):
    """At exit the trainer waits for its writer at most the timeout, warns, and leaves it be."""
    waited, warned, says_why, code = _run(_STOPPED_WRITER, tmp_path, tmp_path).split()
    assert 0.5 <= float(waited) < 30 and warned == "1" and says_why == "True" and code == "0"
