"""A fast seeded subset of the fuzz suite (the full run is scripts/fuzz).

Corrupted copies of small real checkpoints (stashpoint from 1 and 2 ranks, DCP, HF
safetensors, single and sharded) go through load / load_hf / load_full / iter_full /
read_index / verify / `stashpoint verify`; every outcome must be a correct result or a
named error: no raw exception, hang, read outside the checkpoint, oversized allocation,
silently wrong value, or target changed by a failed load.
"""

from __future__ import annotations

import pytest

import fuzz_run

SEED = 20261130


@pytest.fixture(scope="module")
def outcomes(pools, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz"))
    pool = pools(2)
    return fuzz_run.run_all(
        root, lambda fn, path: pool.run(fn, path), SEED, per_kind=1, deadline_s=6.0, fast=True
    )


def _failures(outcomes, cls: str) -> list[str]:
    bad = [o for o in outcomes if o.cls == cls]
    return [f"{o.op} on {o.case} ({o.detail}): {o.exc} at {o.where or o.origin}: {o.message}" for o in bad]


def test_every_format_and_kind_was_exercised(outcomes):
    kinds = {o.kind for o in outcomes}
    originals = {o.original for o in outcomes}
    assert {"sp1", "sp2", "dcp", "hf1", "hf2"} <= originals
    assert {"fifo", "symlink_out", "path_trick", "oversized", "json_nesting", "json_duplicate"} <= kinds
    # the untouched originals read back exactly: the comparisons below mean something
    assert all(o.cls == "ok" for o in outcomes if o.kind == "none"), _failures(outcomes, "rejected_valid")


@pytest.mark.parametrize("cls", fuzz_run.FAILURES)
def test_no_failures_of_class(outcomes, cls):
    bad = _failures(outcomes, cls)
    assert not bad, f"{len(bad)} operations ended as {cls}:\n" + "\n".join(bad[:40])
