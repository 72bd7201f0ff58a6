"""The elastic torchrun recipe of docs/RESILIENCE.md ("Node loss"), run for real: two agents
(``--nnodes 1:2``, c10d rendezvous on loopback), each a simulated node with its own memory
root; every process of one node is SIGKILLed and its memory deleted; the surviving agent
restarts its workers on the smaller world and they resume from the protected memory tier."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import node_loss_cases

STEPS = 3


def _agent(tmp_path, shm, port: int, host: bool) -> subprocess.Popen:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, STASHPOINT_SHM_DIR=str(shm), OMP_NUM_THREADS="1")
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a rendezvous store per attempt (torchrun pitfall)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    conf = f"is_host={str(host).lower()},last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", conf,
        os.path.join(here, "torchrun_nodeloss_job.py"),
        str(tmp_path / "ckpt"), str(tmp_path / "out"), str(STEPS),
    ]  # fmt: skip
    with open(tmp_path / f"agent-{'a' if host else 'b'}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _wait_files(paths, timeout: float, agents) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        assert all(a.poll() is None for a in agents), [a.poll() for a in agents]
        time.sleep(0.2)


def test_elastic_torchrun_continues_on_the_surviving_node_from_protected_memory(tmp_path):
    shm_a, shm_b, out = tmp_path / "shm-a", tmp_path / "shm-b", tmp_path / "out"
    for d in (shm_a, shm_b, out):
        d.mkdir()
    port = node_loss_cases.free_port()
    a = _agent(tmp_path, shm_a, port, host=True)
    time.sleep(1.0)  # agent a hosts the rendezvous store
    b = _agent(tmp_path, shm_b, port, host=False)
    try:
        _wait_files([out / "ready0.json", out / "ready1.json"], 300, [a, b])
        ready = {r: json.loads((out / f"ready{r}.json").read_text()) for r in range(2)}
        assert all(r["world"] == 2 and r["attempt"] == 0 for r in ready.values()), ready
        # node b is lost: its agent, its worker and its keeper, and its memory
        victims = [b.pid, *_descendants(b.pid), *node_loss_cases.keepers_of(str(shm_b))]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        b.wait()
        shutil.rmtree(shm_b)
        assert a.wait(timeout=400) == 0, (tmp_path / "agent-a.log").read_text()[-4000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for pid in node_loss_cases.keepers_of(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
    got = json.loads((out / "rank0.json").read_text())
    assert got["attempt"] >= 1 and got["world"] == 1, got
    assert got["resumed"] == ["memory", STEPS, True], got  # node b's rank rebuilt from its replica
    assert any("UnprotectedWarning" in w for w in got["warnings"]), got  # one node left
    deadline = time.monotonic() + 30
    while [n for n in os.listdir(shm_a) if n.startswith("stashpoint-mem-")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [n for n in os.listdir(shm_a) if n.startswith("stashpoint-mem-")]
