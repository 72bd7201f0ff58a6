"""Staging buffers reused across async saves; at most ``max_in_flight`` in use at once.

Each buffer is a :class:`~stashpoint.engine.staging.SharedBuffer` that the writer
process created (and owns); the trainer maps and page-locks it once.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from stashpoint import errors
from stashpoint.engine.staging import SharedBuffer, align
from stashpoint.engine.writer_client import BackgroundWriter
from stashpoint.vocab import IfBusy

#: extra room in a new staging buffer, so small changes in the state reuse it: an eighth
#: of the state, at most 64 MiB (a fixed 64 MiB made a one-tensor save need more than
#: Docker's default 64 MiB of /dev/shm)
SLACK_FRACTION = 8
MAX_SLACK_BYTES = 64 << 20


def buffer_size(size: int) -> int:
    """The size of a new staging buffer for ``size`` bytes of state, slack included."""
    return align(size + min(MAX_SLACK_BYTES, size // SLACK_FRACTION))


@dataclass
class Slot:
    """One staging buffer of the pool; ``busy`` while a save stages into it or persists it."""

    tag: str
    buffer: SharedBuffer
    writer: BackgroundWriter  # the process that owns the buffer
    busy: bool = False


@dataclass
class StagingPool:
    """Staging buffers reused across saves; at most ``max_in_flight`` in use at once."""

    max_in_flight: int = 1
    slots: list[Slot] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    counter: itertools.count = field(default_factory=itertools.count)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.buffer.size for s in self.slots if s.buffer.pinned)

    @property
    def staged_bytes(self) -> int:
        return sum(s.buffer.size for s in self.slots)

    def acquire(self, writer: BackgroundWriter, size: int, if_busy: IfBusy, timeout_s: float) -> Slot | None:
        """A free buffer of at least ``size`` bytes; None when busy and ``if_busy="skip"``."""
        with self.cond:
            # buffers of a writer process that died went with it
            for dead in [s for s in self.slots if s.writer is not writer and not s.busy]:
                self.slots.remove(dead)
                dead.buffer.close()
            while True:
                free = [s for s in self.slots if not s.busy]
                if free or len(self.slots) < self.max_in_flight:
                    break
                if if_busy == "skip":
                    return None
                if not self.cond.wait(timeout=timeout_s):
                    raise errors.CoordinationError(f"no staging buffer freed up within {timeout_s:g}s")
            slot = next((s for s in free if s.buffer.size >= size), None)
            if slot is None:
                if free:  # too small: replace the smallest free one
                    old = min(free, key=lambda s: s.buffer.size)
                    self.slots.remove(old)
                    old.buffer.close()
                    writer.free(old.tag)
                tag = f"slot{next(self.counter)}"
                buf = writer.allocate(tag, buffer_size(size), timeout_s)
                buf.pin()
                slot = Slot(tag=tag, buffer=buf, writer=writer)
                self.slots.append(slot)
            slot.busy = True
            return slot

    def release(self, slot: Slot) -> None:
        with self.cond:
            slot.busy = False
            self.cond.notify_all()


_POOL = StagingPool()


def staging_pool() -> StagingPool:
    return _POOL
