"""crc32c over fixed-size blocks, so partial reads can be verified."""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data: memoryview | bytes, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def block_crcs(data: memoryview, block: int) -> list[int]:
    view = memoryview(data).cast("B")
    return [_crc32c.crc32c(view[i : i + block]) for i in range(0, len(view), block)] or [0]
