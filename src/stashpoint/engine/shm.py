"""Staging files in shared memory: names that say who owns them, and reclaiming the dead's.

A staging buffer is a file in ``/dev/shm`` (or ``STASHPOINT_SHM_DIR``) created by a
background writer process.  The writer unlinks its files when it exits normally, but a
writer killed by SIGKILL or the OOM killer cannot, and ``/dev/shm`` is memory: each
orphan holds as many bytes as the state it staged until the machine reboots.

So every name carries its owner: ``stashpoint-<pid>-<start>-<tag>``, where ``start`` is
the owner's start time in clock ticks since boot (``/proc/<pid>/stat``, field 22).
A file is an orphan when no process with that PID exists, or one does but started at
another time (the PID was reused).  :func:`reclaim_orphans` removes orphans; the
writer calls it when it starts, and so do the checkpoint manager and the command line.
Names of the older form ``stashpoint-<pid>-<tag>`` are judged by the PID alone.

Torch-free, so the command line can call it without importing torch.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

PREFIX = "stashpoint-"
_NAME = re.compile(r"^stashpoint-(\d+)-(?:(\d+)-)?(.+)$")


def shm_dir() -> str:
    """Where staging files live: ``STASHPOINT_SHM_DIR``, else ``/dev/shm``, else ``TMPDIR``."""
    configured = os.environ.get("STASHPOINT_SHM_DIR")
    if configured:
        return configured
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    return os.environ.get("TMPDIR", "/tmp")


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = line[line.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def shm_path(tag: str) -> str:
    """A new staging file name for ``tag``, owned by this process."""
    pid = os.getpid()
    start = process_start(pid) or 0
    return os.path.join(shm_dir(), f"{PREFIX}{pid}-{start}-{tag}")


@dataclass(frozen=True)
class Owner:
    """The process a staging file name says created it (``start`` None for old names)."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, name: str) -> Owner | None:
        m = _NAME.match(name)
        if m is None:
            return None
        return cls(pid=int(m.group(1)), start=int(m.group(2)) if m.group(2) else None)

    def alive(self) -> bool:
        if self.pid <= 0:
            return False
        actual = process_start(self.pid)
        if actual is not None:
            return self.start is None or self.start == 0 or actual == self.start
        if os.path.isdir("/proc/self"):
            return False  # /proc is there and has no such process
        try:  # no /proc: a signal probe tells whether the PID exists at all
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


@dataclass(frozen=True)
class Reclaimed:
    """A staging file removed because its owner is gone."""

    path: str
    bytes: int
    owner: Owner


def reclaim_orphans(directory: str | None = None) -> list[Reclaimed]:
    """Remove the staging files of writer processes that no longer exist; never raises.

    Only regular files named like ours are considered, and only when their owner is
    dead: a live writer's buffers (of this or any other job on the machine) are kept.
    """
    root = directory or shm_dir()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    out = []
    for name in names:
        owner = Owner.of(name)
        if owner is None or owner.alive():
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            os.unlink(path)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
        out.append(Reclaimed(path=path, bytes=st.st_size, owner=owner))
    return out


