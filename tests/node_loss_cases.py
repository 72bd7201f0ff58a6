"""Trainer processes for the node-loss tests: simulated nodes on one machine.

A simulated node is a directory of its own standing for the node's shared memory
(``STASHPOINT_SHM_DIR``) and the processes started with it: its trainers and the
keepers they start.  All ranks form one gloo process group.  The state is a tensor
sharded over the ranks (a DTensor), a replicated tensor and a counter, all a known
function of the step, so a restore is checked bit for bit at any world size.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from stashpoint import CheckpointManager
from stashpoint.engine.rebuild import held_bytes
from stashpoint.engine.snapshot import SnapshotHandle
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import SavePolicy

#: the sharded tensor's length: divisible by every world size the tests use (1 to 4 ranks)
LENGTH = 12 * 65536  # 3 MiB of float32


def expected(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full sharded tensor and the replicated one at ``step`` (exact in float32)."""
    return torch.arange(LENGTH, dtype=torch.float32) + step, torch.full((1000,), float(step) * 0.25)


def _state(world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.zeros(LENGTH), mesh, [Shard(0)])
    return {"w": w, "b": torch.zeros(1000), "loader": {"step": 0}}


def _set(state: dict, step: int, rank: int, world: int) -> None:
    full, b = expected(step)
    with torch.no_grad():
        state["w"].to_local().copy_(torch.chunk(full, world)[rank])
        state["b"].copy_(b)
    state["loader"]["step"] = step


def _exact(state: dict) -> bool:
    step = state["loader"]["step"]
    full, b = expected(step)
    return bool(torch.equal(state["w"].full_tensor(), full) and torch.equal(state["b"], b))


def node_job(rank, world, init_file, job, results) -> None:
    """One trainer rank of the job ``job`` (a dict: durable, shm_base, node_dirs, per_node,
    protection, steps, durable_every, final).  Resumes from whatever the manager finds,
    snapshots up to ``steps``, reports; then closes (``final``) or waits to be killed."""
    per_node = job["per_node"]
    shm = os.path.join(job["shm_base"], job["node_dirs"][rank // per_node])
    os.environ["STASHPOINT_SHM_DIR"] = shm
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    state = _state(world)
    policy = MemoryPolicy(
        every_steps=1,
        slots=3,
        if_busy="wait",
        reattach_s=120,
        signal=None,
        protection=job["protection"],
        ranks_per_node=per_node,
        peer_transport=job.get("peer_transport", "auto"),
        listen_host="127.0.0.1",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = CheckpointManager(
            job["durable"],
            memory=policy,
            save_policy=SavePolicy(every_steps=job["durable_every"]),
            timeout_s=60,
        )
        info = mgr.load_latest(state)
    resumed = None if info is None else (info.tier, info.step, _exact(state))
    phases = {}
    for step in range(state["loader"]["step"] + 1, job["steps"] + 1):
        _set(state, step, rank, world)
        handle = mgr.maybe_save(step, state)
        if isinstance(handle, SnapshotHandle):  # not a step with a durable save
            phases = dict(handle.wait(60).phase_seconds)
    mgr.wait()
    dist.barrier()  # every keeper has protected every snapshot: parity groups are complete
    report = {
        "resumed": resumed,
        "warnings": [(w.category.__name__, str(w.message)) for w in caught],
        "phases": phases,
        "held_bytes": held_bytes(mgr.memory_root),
        "root": mgr.memory_root,
    }
    results.put((rank, "ready", report))
    if job["final"]:
        mgr.close()
        dist.destroy_process_group()
        results.put((rank, "closed", None))
        return
    time.sleep(600)  # the test kills this job
    os.kill(os.getpid(), signal.SIGKILL)


def keepers_of(shm: str) -> list[int]:
    """The keeper processes started for the simulated node whose memory is under ``shm``."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"stashpoint.engine.keeper_main" in args and any(a.startswith(shm.encode() + b"/") for a in args):
            out.append(int(pid))
    return out


def listening_ports(pid: int) -> list[int]:
    """The loopback TCP ports process ``pid`` listens on (from /proc: socket inodes of its fds)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return []
    ports = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A" and local.startswith("0100007F:") and f"socket:[{inode}]" in inodes:
                ports.append(int(local.split(":")[1], 16))
    return ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
