"""Save and retention policies: small validated objects, pure decisions."""

from __future__ import annotations

from dataclasses import dataclass

from stashpoint.errors import InvalidOptionError
from stashpoint.vocab import MetricGoal, choose


def check_positive(option: str, value: object, *, integer: bool = False, or_none: bool = True) -> None:
    """Raise :class:`InvalidOptionError` unless ``value`` is a positive number (or None if allowed)."""
    if value is None and or_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise InvalidOptionError(f"{option} must be {what}{' or None' if or_none else ''}, not {value!r}")


@dataclass(frozen=True, kw_only=True)
class SavePolicy:
    """Save when ``every_steps`` steps or ``every_seconds`` seconds have passed since the last save."""

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        check_positive("every_steps", self.every_steps, integer=True)
        check_positive("every_seconds", self.every_seconds)

    def due(self, step: int, last_step: int | None, seconds_since_last: float | None) -> bool:
        if self.every_steps is not None:
            if last_step is None and step % self.every_steps == 0:
                return True
            if last_step is not None and step - last_step >= self.every_steps:
                return True
        if self.every_seconds is not None and seconds_since_last is not None:
            return seconds_since_last >= self.every_seconds
        return False


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; everything else is deleted.

    A checkpoint is kept if it is among the ``keep_last`` newest, among the
    ``keep_best`` best by ``metric`` (``mode`` "min" or "max"), or its step is a
    multiple of ``keep_every`` (kept forever).  ``keep_last=None`` keeps everything.
    """

    keep_last: int | None = 3
    keep_best: int = 0
    metric: str | None = None
    mode: MetricGoal = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        check_positive("keep_last", self.keep_last, integer=True)  # the latest one is always kept
        if self.keep_best != 0:
            check_positive("keep_best", self.keep_best, integer=True, or_none=False)
        if self.keep_best and not (isinstance(self.metric, str) and self.metric):
            raise InvalidOptionError(f"keep_best={self.keep_best} needs a metric name, not {self.metric!r}")
        choose("mode", self.mode, MetricGoal)
        check_positive("keep_every", self.keep_every, integer=True)

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
