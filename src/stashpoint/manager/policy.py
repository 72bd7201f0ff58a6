"""Save and retention policies: small validated objects, pure decisions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SavePolicy:
    """Save when ``every_steps`` steps or ``every_seconds`` seconds have passed since the last save."""

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps <= 0:
            raise ValueError("every_steps must be positive")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError("every_seconds must be positive")

    def due(self, step: int, last_step: int | None, seconds_since_last: float | None) -> bool:
        if self.every_steps is not None:
            if last_step is None and step % self.every_steps == 0:
                return True
            if last_step is not None and step - last_step >= self.every_steps:
                return True
        if self.every_seconds is not None and seconds_since_last is not None:
            return seconds_since_last >= self.every_seconds
        return False


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; everything else is deleted.

    A checkpoint is kept if it is among the ``keep_last`` newest, among the
    ``keep_best`` best by ``metric`` (``mode`` "min" or "max"), or its step is a
    multiple of ``keep_every`` (kept forever).  ``keep_last=None`` keeps everything.
    """

    keep_last: int | None = 3
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the latest checkpoint is always kept)")
        if self.keep_best and not self.metric:
            raise ValueError("keep_best needs a metric name")
        if self.mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ValueError("keep_every must be positive")

    def keep(self, checkpoints: list[tuple[int, dict]]) -> set[int]:
        """Steps to keep, given ``(step, metrics)`` of every committed checkpoint."""
        if self.keep_last is None:
            return {s for s, _ in checkpoints}
        steps = sorted(s for s, _ in checkpoints)
        kept = set(steps[-self.keep_last :])
        if self.keep_best:
            scored = [(m[self.metric], s) for s, m in checkpoints if self.metric in (m or {})]
            scored.sort(reverse=self.mode == "max")
            kept.update(s for _, s in scored[: self.keep_best])
        if self.keep_every:
            kept.update(s for s in steps if s % self.keep_every == 0)
        return kept
