"""XOR parity over byte buffers, and the pace of protection traffic.

XOR is a single-erasure code: the parity of a stripe is the XOR of its members' slot
files (each zero-padded to the longest), and any one member is the parity XOR the
others, cut to its own length.  numpy's XOR runs at memory speed on a few cores; the
work is done in pieces so a large slot never needs a second copy in memory.
"""

from __future__ import annotations

import time

import numpy as np

from stashpoint.engine.checksum import CRC_THREADS, PARALLEL_MIN_BYTES, spans, worker_pool

#: bytes XOR-ed (or copied) per piece: small enough to pace, large enough to run at full speed
PIECE_BYTES = 8 << 20


def _array(buf: memoryview) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def xor_into(dst: memoryview, src: memoryview, pacer: Pacer | None = None) -> None:
    """``dst[:len(src)] ^= src`` (``dst`` must be writable and at least as long)."""
    n = len(src)
    if len(dst) < n:
        raise ValueError(f"xor_into: destination of {len(dst)} bytes is shorter than the source ({n})")
    d, s = _array(dst), _array(src)
    if pacer is None and n >= PARALLEL_MIN_BYTES:  # unpaced: every core's share at once
        list(
            worker_pool().map(
                lambda r: np.bitwise_xor(d[r[0] : r[1]], s[r[0] : r[1]], out=d[r[0] : r[1]]),
                spans(n, PIECE_BYTES, CRC_THREADS),
            )
        )
        return
    for a in range(0, n, PIECE_BYTES):
        b = min(n, a + PIECE_BYTES)
        np.bitwise_xor(d[a:b], s[a:b], out=d[a:b])
        if pacer is not None:
            pacer.took(b - a)


class Pacer:
    """Keeps a stream of bytes at or under ``rate`` bytes per second (None: no limit)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def took(self, nbytes: int) -> None:
        if self.rate is None:
            return
        self.sent += nbytes
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
