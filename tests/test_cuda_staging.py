"""Staging from a CUDA device: lazy saves and memory snapshots through the device buffer,
whose bytes reach the host in runs (a few large copies), are bit-exact.

Skipped without a CUDA device (the CPU suite covers the same paths with host tensors);
run on a GPU machine with ``pytest tests/test_cuda_staging.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stashpoint
from stashpoint import CheckpointManager
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import SavePolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _job(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(33, 17), nn.Linear(17, 5)).cuda()
    model.register_buffer("odd", torch.arange(7, dtype=torch.uint8, device="cuda"))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    return {
        "model": model,
        "optim": optim,
        "half": torch.randn(9, device="cuda", dtype=torch.bfloat16),
        "blob": {3, 1, 2},  # stored as pickle, between the tensors of the data file
        "step": 0,
    }


def _train(state: dict) -> None:
    model, optim = state["model"], state["optim"]
    model(torch.randn(4, 33, device="cuda")).square().mean().backward()
    optim.step()
    optim.zero_grad()
    state["half"].add_(1)
    state["step"] += 1


def _copy(state: dict) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for i, st in enumerate(state["optim"].state.values()):
        out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items()})
    out["half"] = state["half"].clone()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_saves_through_the_device_buffer_are_exact(tmp_path):
    state = _job(0)
    for i in range(3):
        _train(state)
        want = _copy(state)
        handle = stashpoint.async_save(
            state, str(tmp_path / f"s{i}"), mode="lazy", device_buffer=True, allow_pickle=True
        )
        _train(state)  # overwrites what is being staged
        handle.wait(120)
        other = _job(1)
        _train(other)
        stashpoint.load(other, str(tmp_path / f"s{i}"), allow_pickle=True)
        assert _same(_copy(other), want), i
        assert other["blob"] == {1, 2, 3} and other["step"] == i * 2 + 1


def test_memory_snapshots_through_the_device_buffer_are_exact(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    policy = MemoryPolicy(every_steps=1, slots=3, signal=None, shm_dir=str(shm))
    state = _job(0)
    state.pop("blob")
    mgr = CheckpointManager(
        str(tmp_path / "ckpt"),
        memory=policy,
        save_policy=SavePolicy(every_steps=10**9),
        mode="lazy",
        device_buffer=True,
    )
    wants = {}
    for _ in range(5):  # more snapshots than slots: every slot reused
        _train(state)
        wants[state["step"]] = _copy(state)
        mgr.maybe_save(state["step"], state).wait(120)
    mgr.close(release_memory=False)
    other = _job(1)
    other.pop("blob")
    _train(other)
    mgr = CheckpointManager(str(tmp_path / "ckpt"), memory=policy, save_policy=SavePolicy(every_steps=10**9))
    info = mgr.load_latest(other)
    mgr.close()
    assert info.tier == "memory" and info.step == 5
    assert _same(_copy(other), wants[5])
