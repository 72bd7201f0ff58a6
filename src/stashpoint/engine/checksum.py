"""crc32c over fixed-size blocks, so partial reads can be verified."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import crc32c as _crc32c

#: threads that checksum (and XOR) large buffers; crc32c and numpy release the GIL
CRC_THREADS = int(os.environ.get("STASHPOINT_CRC_THREADS", str(min(8, os.cpu_count() or 1))))
#: below this many bytes a buffer is checksummed on the calling thread
PARALLEL_MIN_BYTES = 64 << 20

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def crc32c(data: memoryview | bytes, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def block_crcs(data: memoryview, block: int) -> list[int]:
    view = memoryview(data).cast("B")
    return [_crc32c.crc32c(view[i : i + block]) for i in range(0, len(view), block)] or [0]


def worker_pool() -> ThreadPoolExecutor:
    """The process's pool for checksumming and XOR of large buffers (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="stashpoint-crc")
        return _POOL


def spans(size: int, block: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` pieces of ``size`` bytes, each a whole number of ``block``s but the last."""
    per = block * max(1, -(-size // block // max(1, parts)))
    return [(a, min(size, a + per)) for a in range(0, size, per)]


def parallel_block_crcs(data: memoryview, block: int) -> list[int]:
    """:func:`block_crcs` of a large buffer on :data:`CRC_THREADS` threads (the same result).

    Not for use from inside the pool's own tasks (they would wait on each other).
    """
    view = memoryview(data).cast("B")
    if len(view) < PARALLEL_MIN_BYTES or CRC_THREADS <= 1:
        return block_crcs(view, block)
    parts = worker_pool().map(
        lambda s: block_crcs(view[s[0] : s[1]], block), spans(len(view), block, CRC_THREADS)
    )
    return [c for part in parts for c in part]
