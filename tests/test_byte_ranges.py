"""A rank that loads 1/M of a tensor reads about 1/M of its bytes."""

from __future__ import annotations

import pytest

import stashpoint

import dist_cases

MiB = 1 << 20


@pytest.mark.parametrize(
    ("shape", "dim", "verify", "slack"),
    [
        # rows: each rank's part is one contiguous range; checksum blocks add at most 2 MiB
        ((3000, 1000), 0, True, 2 * MiB),
        ((3000, 1000), 0, False, 0),
        # columns of long rows: strided parts, read row by row
        ((48, 100_000), 1, False, 64 << 10),
    ],
    ids=["rows-verified", "rows-unverified", "columns-unverified"],
)
def test_loading_one_mth_reads_one_mth(pools, tmp_path, shape, dim, verify, slack):
    path = str(tmp_path / "ckpt")
    stashpoint.save({"w": dist_cases.make_global(shape, "float32", 7)}, path)
    total = shape[0] * shape[1] * 4
    for world in (3, 4):
        for rank, r in enumerate(pools(world).run(dist_cases.byte_range_case, path, shape, dim, verify)):
            assert r["exact"], (world, rank)
            assert r["bytes_read"] >= r["local_bytes"]
            assert r["bytes_read"] <= r["local_bytes"] + slack, (world, rank, r, total)
