"""The core save / load / reshard cases and the manager cases, with S3 as the storage.

Multi-rank cases reuse ``dist_cases`` through ``s3_cases.with_env`` (ranks get the
S3 environment with each task); the resharding property reuses the strategy of
``test_resharding`` with fewer examples, since each one is a few S3 round trips.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import s3_cases
import stashpoint
from stashpoint.manager import CheckpointManager, RetentionPolicy, SavePolicy
from stashpoint.storage import resolve
from test_resharding import cases

import dist_cases


@settings(
    max_examples=6,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_save_at_n_load_at_m_is_bit_exact_on_s3(pools, s3_server, case):
    url = s3_server.url("reshard")
    env = s3_server.env
    pools(case["save_world"]).run(s3_cases.with_env, env, "dist_cases", "save_case", case, url)
    results = pools(case["load_world"]).run(s3_cases.with_env, env, "dist_cases", "load_case", case, url)
    for rank, r in enumerate(results):
        assert r["mismatches"] == [], f"rank {rank} got wrong data for {r['mismatches']} in {case}"
        assert r["step"] == case["step"]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_loading_one_mth_fetches_one_mth_from_s3(pools, s3_server, verify):
    """Counted at the S3 client: the bytes that came over the wire, not the engine's tally."""
    shape, MiB = (3000, 1000), 1 << 20
    url = s3_server.url("ckpt")
    stashpoint.save({"w": dist_cases.make_global(shape, "float32", 7)}, url)
    slack = (2 * MiB if verify else 0) + (64 << 10)  # checksum blocks; index and header
    for world in (3, 4):
        results = pools(world).run(
            s3_cases.counted, s3_server.env, "dist_cases", "byte_range_case", url, shape, 0, verify
        )
        for rank, r in enumerate(results):
            assert r["exact"], (world, rank)
            assert r["local_bytes"] <= r["s3_bytes"] <= r["local_bytes"] + slack, (world, rank, r)


# --- the manager on S3 ----------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"w": torch.full((64, 64), value), "step": int(value)}


def _steps(root_url: str) -> list[int]:
    storage, root = resolve(root_url)
    return sorted(int(n.split("-")[1]) for n in storage.list(root) if n.startswith("step-"))


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_manager_retention_on_s3(s3_server, tmp_path, mode):
    root = s3_server.url("run")
    retention = RetentionPolicy(keep_last=2, keep_best=1, metric="loss", mode="min")
    losses = {10: 5.0, 20: 1.0, 30: 4.0, 40: 3.0, 50: 6.0}
    with CheckpointManager(
        root,
        save_policy=SavePolicy(every_steps=10),
        retention=retention,
        mode=mode,
        telemetry_path=str(tmp_path / "telemetry.jsonl"),
    ) as manager:
        for step in range(1, 51):
            manager.maybe_save(step, _state(step), metrics={"loss": losses.get(step, 0.0)})
    assert _steps(root) == [20, 40, 50]
    latest = manager.latest()
    assert latest.step == 50 and latest.path.startswith("s3://")
    state = _state(0)
    assert manager.load_latest(state).step == 50 and torch.equal(state["w"], torch.full((64, 64), 50.0))


def test_manager_latest_skips_incomplete_and_corrupt_on_s3(s3_server, tmp_path):
    root = s3_server.url("run")
    manager = CheckpointManager(
        root, mode="sync", retention=RetentionPolicy(keep_last=None), telemetry_path=str(tmp_path / "t")
    )
    for step in (1, 2, 3, 4):
        manager.save(step, _state(step))
    manager.wait()
    storage, base = resolve(root)
    storage.delete(storage.join(base, "step-000000004", "index.json"))  # never committed
    storage.write_bytes(storage.join(base, "step-000000003", "index.json"), b"{not json")
    with pytest.warns(UserWarning) as warned:
        latest = manager.latest()
    assert latest.step == 2 and len(warned) == 2
    assert CheckpointManager(s3_server.url("empty"), mode="sync").latest() is None
