"""Node loss: protected memory snapshots rebuilt after every process and the memory of a node are gone.

Simulated nodes on one machine (:mod:`node_loss_cases`): each has its own shared-memory
root and its own processes (trainers over one gloo group, and their keepers).  Losing a
node is real: its trainers and keepers are SIGKILLed and its memory root deleted; the
other trainers are SIGKILLed too (as torchrun's agent does before a restart) while their
keepers live on.  Each test is one job going through several losses, to keep the
process start-ups few.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import tempfile
import time

import pytest
import torch.multiprocessing as mp

import node_loss_cases
from stashpoint import Parity, Replicate

CTX = mp.get_context("spawn")


def _run(job: dict, world: int, timeout: float = 300) -> tuple[list, dict]:
    """Start the job's ranks and wait until each reports (closed, for a final job)."""
    init_file = tempfile.mktemp(prefix="stashpoint-nodeloss-rdzv-")
    results = CTX.Queue()
    procs = [
        CTX.Process(target=node_loss_cases.node_job, args=(r, world, init_file, job, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    want = "closed" if job["final"] else "ready"
    got: dict = {}
    done: set = set()
    deadline = time.monotonic() + timeout
    while len(done) < world:
        if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
            _kill(procs)
            pytest.fail(
                f"the job did not get every rank to {want!r}: {got}, exit codes {[p.exitcode for p in procs]}"
            )
        try:
            rank, kind, payload = results.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind == "ready":
            got[rank] = payload
        if kind == want:
            done.add(rank)
    if job["final"]:
        for p in procs:
            p.join(60)
    return procs, got


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(30)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _lose_nodes(procs, job: dict, lost: list[int], *, replace: bool) -> None:
    """SIGKILL every process of the ``lost`` nodes and delete their memory; the other trainers
    are SIGKILLed as a restart would (their keepers stay); ``replace``: empty memory roots."""
    dirs = [os.path.join(job["shm_base"], job["node_dirs"][n]) for n in lost]
    keepers = [pid for d in dirs for pid in node_loss_cases.keepers_of(d)]
    assert keepers, "each lost node has its keepers"
    for pid in keepers:
        os.kill(pid, signal.SIGKILL)
    _kill(procs)
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in keepers) and time.monotonic() < deadline:
        time.sleep(0.05)
    for n in lost:
        d = os.path.join(job["shm_base"], job["node_dirs"][n])
        shutil.rmtree(d)
        if replace:
            os.makedirs(d)


def _corrupt(shm: str, pattern: tuple[str, str]) -> str:
    """Flip one byte in the middle of the file of ``pattern`` (directory prefix, name prefix)."""
    d = next(n for n in os.listdir(shm) if n.startswith("stashpoint-mem-"))
    root = os.path.join(shm, d)
    sub = next(n for n in os.listdir(root) if n.startswith(pattern[0]))
    name = next(
        n for n in os.listdir(os.path.join(root, sub)) if n.startswith(pattern[1]) and not n.endswith(".json")
    )
    path = os.path.join(root, sub, name)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    return path


def _warned(report: dict, category: str, text: str) -> bool:
    return any(c == category and text in m for c, m in report["warnings"])


@pytest.fixture
def nodes(tmp_path):
    base = tmp_path / "shm"
    dirs = [f"n{i}" for i in range(4)]
    for d in dirs:
        (base / d).mkdir(parents=True)
    yield str(base)
    for pid in node_loss_cases.keepers_of(str(base)):  # keepers a failed test left behind
        os.kill(pid, signal.SIGKILL)


def _job(tmp_path, shm_base: str, protection, **kw) -> dict:
    job = {"durable": str(tmp_path / "ckpt"), "shm_base": shm_base, "protection": protection, "final": False}
    job.update(kw)
    return job


def test_replication_rebuilds_a_lost_node_at_the_same_and_a_smaller_world(tmp_path, nodes):
    """2 nodes of 2 ranks, one replica: lose node 1, resume on a replacement node; lose it
    again with a damaged replica, resume on node 0 alone from the older snapshot."""
    job = _job(
        tmp_path, nodes, Replicate(copies=1), node_dirs=["n0", "n1"], per_node=2, steps=3, durable_every=100
    )
    procs, first = _run(job, 4)
    assert first[0]["resumed"] is None
    assert all("protect" in r["phases"] and "protect_lag" in r["phases"] for r in first.values()), first
    # each node holds the three newest snapshots of the other node's two ranks (3 MiB / 2 each)
    assert first[0]["held_bytes"] >= 3 * 2 * (node_loss_cases.LENGTH * 4 // 4)
    _lose_nodes(procs, job, [1], replace=True)

    job.update(steps=4)
    procs, second = _run(job, 4)
    for r in range(4):
        assert second[r]["resumed"] == ("memory", 3, True), second[r]
    _lose_nodes(procs, job, [1], replace=False)
    damaged = _corrupt(os.path.join(nodes, "n0"), ("held-rank-00002", "s000000004"))

    job.update(node_dirs=["n0"], final=True)
    _, third = _run(job, 2)
    for r in range(2):
        assert third[r]["resumed"] == ("memory", 3, True), third[r]  # step 4's replica is damaged
    assert _warned(third[0], "UserWarning", "replica of rank 2 of the memory snapshot of step 4 is unusable")
    assert _warned(third[0], "UserWarning", os.path.basename(damaged))
    assert _warned(third[0], "UnprotectedWarning", "replicate(copies=1) needs 2 nodes")


def test_parity_rebuilds_whichever_node_is_lost_and_falls_back_beyond_its_protection(tmp_path, nodes):
    """4 nodes of 1 rank, parity groups of 2: lose node 0 (its newest parity damaged: the
    older snapshot is rebuilt), then node 1 (resumed on 3 nodes), then two nodes of one group
    (beyond the protection: the durable checkpoint)."""
    job = _job(
        tmp_path,
        nodes,
        Parity(group=2),
        node_dirs=["n0", "n1", "n2", "n3"],
        per_node=1,
        steps=3,
        durable_every=2,
    )
    procs, first = _run(job, 4)
    assert all("protect" in r["phases"] for r in first.values()), first
    _lose_nodes(procs, job, [0], replace=True)
    damaged = _corrupt(os.path.join(nodes, "n2"), ("parity-g00000-s00000", "s000000003"))

    job.update(steps=4)
    procs, second = _run(job, 4)
    for r in range(4):
        assert second[r]["resumed"] == ("memory", 2, True), second[r]
    assert _warned(second[0], "UserWarning", "parity of rank 0 of the memory snapshot of step 3 is unusable")
    assert _warned(second[0], "UserWarning", os.path.basename(damaged))
    _lose_nodes(procs, job, [1], replace=False)

    job.update(node_dirs=["n0", "n2", "n3"], steps=5)
    procs, third = _run(job, 3)
    for r in range(3):
        assert third[r]["resumed"] == ("memory", 4, True), third[r]  # rank 1 rebuilt, resharded 4 -> 3
    _lose_nodes(procs, job, [0, 1], replace=False)  # n0 and n2: both nodes of the group {0, 1}

    job.update(node_dirs=["n3"], final=True)
    _, fourth = _run(job, 1)
    assert fourth[0]["resumed"] == ("local", 4, True), fourth[0]
    assert _warned(fourth[0], "ProtectionExceededWarning", "step 5: ranks [0, 1]")
    assert os.listdir(os.path.join(nodes, "n3")) == []  # closed: the memory is freed


def test_parity_over_sockets_rebuilds_at_the_same_and_a_smaller_world(tmp_path, nodes):
    """3 nodes of 1 rank whose keepers talk TCP (each node's root served by its keeper on
    loopback): lose node 1, resume on a replacement node; lose node 0, resume on two nodes."""
    job = _job(
        tmp_path,
        nodes,
        Parity(group=2),
        node_dirs=["n0", "n1", "n2"],
        per_node=1,
        steps=3,
        durable_every=100,
        peer_transport="sockets",
    )
    procs, first = _run(job, 3)
    assert all("protect" in r["phases"] for r in first.values()), first
    for d in job["node_dirs"]:  # every keeper serves its node's memory root
        keepers = node_loss_cases.keepers_of(os.path.join(nodes, d))
        assert keepers and all(node_loss_cases.listening_ports(pid) for pid in keepers), d
    _lose_nodes(procs, job, [1], replace=True)

    job.update(steps=4)
    procs, second = _run(job, 3)
    for r in range(3):
        assert second[r]["resumed"] == ("memory", 3, True), second[r]
    _lose_nodes(procs, job, [0], replace=False)

    job.update(node_dirs=["n1", "n2"], final=True)
    _, third = _run(job, 2)
    for r in range(2):
        assert third[r]["resumed"] == ("memory", 4, True), third[r]["warnings"]  # rank 0 rebuilt, 3 -> 2
