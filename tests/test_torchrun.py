"""The torchrun recipe of docs/RESILIENCE.md, run for real: a worker dies, the elastic
agent restarts the group, and the workers resume from the memory tier; and the warning
stashpoint gives when torchrun would hand restarted workers the previous attempt's store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from stashpoint._dist import Coordinator, shared_store_hazard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_weight(steps: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        optim.zero_grad()
        model(torch.full((4, 16), float(step))).pow(2).mean().backward()
        optim.step()
    return model.weight.sum().item()


def test_torchrun_restart_resumes_from_memory(tmp_path):
    shm, out = tmp_path / "shm", tmp_path / "out"
    shm.mkdir()
    out.mkdir()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, STASHPOINT_SHM_DIR=str(shm), OMP_NUM_THREADS="1")
    # the recipe: every attempt gets a rendezvous store of its own (without it, restarted
    # workers can read the dead workers' gloo addresses and fail or hang in a group set-up)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        os.path.join(here, "torchrun_job.py"), str(tmp_path / "ckpt"), str(out), "6", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in proc.stderr  # no hazard warning
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["attempt"] == 1  # the agent restarted the workers once
        assert r["resumed"] == ["memory", 4], proc.stderr[-3000:]  # the keepers say why not
        assert r["weight"] == _expected_weight(6)  # bit-exact with an uninterrupted run
    assert not [n for n in os.listdir(shm) if n.startswith("stashpoint-mem-")]


AGENT_ENV = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}


def test_shared_store_hazard_only_when_restarts_share_the_agent_store():
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_hazard(AGENT_ENV)
    assert "--max-restarts 3" in shared_store_hazard(AGENT_ENV)
    assert shared_store_hazard({}) is None  # not under torchrun
    assert shared_store_hazard(dict(AGENT_ENV, TORCHELASTIC_USE_AGENT_STORE="False")) is None
    assert shared_store_hazard(dict(AGENT_ENV, TORCHELASTIC_MAX_RESTARTS="0")) is None


def test_control_group_warns_under_a_shared_agent_store(tmp_path, monkeypatch):
    for name, value in AGENT_ENV.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
            coord = Coordinator(None, timeout_s=17.0)
        assert coord.all_gather("x", "test: gather") == ["x"]
    finally:
        dist.destroy_process_group()
