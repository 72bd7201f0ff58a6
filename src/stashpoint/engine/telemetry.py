"""Per-phase wall-clock timings and byte counts for one save or load."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class SaveResult:
    """What one rank did during a save.  ``bytes_written`` counts this rank's data file."""

    path: str
    rank: int
    world_size: int
    bytes_written: int
    total_bytes: int
    phase_seconds: dict[str, float]

    @property
    def seconds(self) -> float:
        return sum(self.phase_seconds.values())


@dataclass(frozen=True)
class LoadResult:
    """What one rank did during a load.  ``bytes_read`` counts data bytes fetched."""

    path: str
    rank: int
    world_size: int
    bytes_read: int
    bytes_loaded: int  # bytes of the target tensors that were filled
    keys: tuple[str, ...]
    phase_seconds: dict[str, float]

    @property
    def seconds(self) -> float:
        return sum(self.phase_seconds.values())
