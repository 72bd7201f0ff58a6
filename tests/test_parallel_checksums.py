"""Checksums and XOR of large buffers spread over threads give the single-thread results."""

from __future__ import annotations

import numpy as np

from stashpoint.engine.checksum import PARALLEL_MIN_BYTES, block_crcs, parallel_block_crcs, spans
from stashpoint.engine.parity import xor_into


def test_spans_cover_the_buffer_in_whole_blocks():
    got = spans(10 * 4096 + 5, 4096, 3)
    assert got[0][0] == 0 and got[-1][1] == 10 * 4096 + 5
    assert all(b == c for (_, b), (c, _) in zip(got, got[1:]))
    assert all((b - a) % 4096 == 0 for a, b in got[:-1])


def test_parallel_block_crcs_equal_the_serial_ones():
    data = np.random.default_rng(0).integers(0, 256, PARALLEL_MIN_BYTES + 12345, dtype=np.uint8)
    view = memoryview(data)
    assert parallel_block_crcs(view, 1 << 20) == block_crcs(view, 1 << 20)


def test_parallel_xor_equals_numpy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, PARALLEL_MIN_BYTES + 777, dtype=np.uint8)
    b = rng.integers(0, 256, PARALLEL_MIN_BYTES + 777, dtype=np.uint8)
    want = a ^ b
    xor_into(memoryview(a), memoryview(b))
    assert np.array_equal(a, want)
