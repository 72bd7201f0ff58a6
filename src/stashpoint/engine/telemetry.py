"""Per-phase wall-clock timings and byte counts for one save or load."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - t0)

    def record(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to a phase (for a phase named only once it is over)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


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
    #: targets this rank left as they were (a partial load, or per-rank items dropped)
    unwritten: tuple[str, ...] = ()
    #: ``(checkpoint name, target name)`` pairs matched through the canonical-name rules
    renamed: tuple[tuple[str, str], ...] = ()

    @property
    def seconds(self) -> float:
        return sum(self.phase_seconds.values())


_APPEND_LOCK = threading.Lock()


def to_record(kind: str, result: SaveResult | LoadResult, **extra) -> dict:
    """One telemetry record: the result's fields plus when and what."""
    rec = {"event": kind, "time_unix": time.time(), **asdict(result), **extra}
    nbytes = rec.get("bytes_written", rec.get("bytes_read", 0))
    seconds = sum(result.phase_seconds.values())
    rec["seconds"] = seconds
    rec["gb_per_s"] = nbytes / seconds / 1e9 if seconds > 0 else None
    for counted in ("keys", "unwritten", "renamed"):  # counts: names can be many
        if counted in rec:
            rec[counted] = len(rec[counted])
    return rec


def append_record(path: str, kind: str, result: SaveResult | LoadResult, **extra) -> None:
    """Append one JSON line to ``path`` (a local file)."""
    line = json.dumps(to_record(kind, result, **extra), sort_keys=True)
    with _APPEND_LOCK:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def env_telemetry(kind: str, result: SaveResult | LoadResult, **extra) -> None:
    """Record to ``$STASHPOINT_TELEMETRY`` when set (every save and load calls this)."""
    path = os.environ.get("STASHPOINT_TELEMETRY")
    if path:
        append_record(path, kind, result, **extra)
