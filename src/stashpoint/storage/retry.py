"""Retries with capped exponential backoff and full jitter, bounded in attempts *and* time.

Remote stores fail transiently (throttling, 5xx, dropped connections, timeouts), and
a checkpoint is worth a few seconds of patience; but a save must never hang, so
every retried call has a deadline as well as an attempt limit.  Jitter spreads the
retries of many ranks hitting one throttled endpoint at the same moment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    #: tries in all, the first one included
    max_attempts: int = 10
    #: the first backoff is drawn from ``[0, base_delay_s]``, then the cap doubles
    base_delay_s: float = 0.1
    #: no single backoff is longer than this
    max_delay_s: float = 5.0
    #: no retry starts after this many seconds since the first try
    deadline_s: float = 120.0

    def delay(self, attempt: int) -> float:
        """Backoff before try number ``attempt + 1`` (``attempt`` >= 1): full jitter."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return random.uniform(0, cap)


class RetriesExhausted(Exception):
    """Raised by :func:`call` when a retryable failure persisted; ``last`` is the final error."""

    def __init__(self, last: BaseException, attempts: int, elapsed: float) -> None:
        super().__init__(f"gave up after {attempts} attempts in {elapsed:.1f}s: {last}")
        self.last, self.attempts, self.elapsed = last, attempts, elapsed


def call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """``fn()``, retried while it raises an error that ``retryable`` accepts.

    A non-retryable error propagates at once, unchanged.  A retryable one that
    outlasts ``policy`` becomes :class:`RetriesExhausted` (chained to the last error),
    so callers can tell "the store is down" from "the request was wrong".
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not retryable(exc):
                raise
            elapsed = time.monotonic() - start
            pause = policy.delay(attempt)
            if attempt >= policy.max_attempts or elapsed + pause > policy.deadline_s:
                raise RetriesExhausted(exc, attempt, elapsed) from exc
            if on_retry is not None:
                on_retry(exc, attempt, pause)
            time.sleep(pause)
