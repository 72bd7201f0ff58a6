"""The torchft transport: a real healing flow through torchft's Lighthouse and Manager, and
the transport itself between processes (memory snapshot and copy, checksums, timeouts)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta

import pytest
import torch

pytest.importorskip("torchft")

from torchft._torchft import LighthouseServer

from stashpoint.errors import (
    ChecksumMismatchError,
    InvalidStateError,
    PeerTimeoutError,
    PeerTransferError,
)
from stashpoint.integrations.peer_http import PeerServer, Published
from stashpoint.integrations.torchft import StashpointTransport

import torchft_cases as cases

SHORT = timedelta(seconds=2)


def assert_same(a: object, b: object, where: str = "") -> None:
    """Bit-exact equality of two state trees (tensors by torch.equal, plain values by ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


@pytest.fixture
def shm(tmp_path, monkeypatch) -> str:
    """A private shared-memory directory, this process's too (copies are made there)."""
    path = os.path.join(tmp_path, "shm")
    os.mkdir(path)
    monkeypatch.setenv("STASHPOINT_SHM_DIR", path)
    return path


def test_lighthouse_heals_a_replica_group_through_stashpoint(tmp_path, shm):
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=10_000)
    ctx = mp.get_context("spawn")
    events, results = (ctx.Event(), ctx.Event(), ctx.Event()), ctx.Queue()
    procs = [
        ctx.Process(
            target=cases.replica_group,
            args=(r, lighthouse.address(), shm, str(tmp_path / f"ckpt{r}"), events, results),
        )
        for r in (0, 1)
    ]
    try:
        procs[0].start()
        procs[1].start()
        got = {r: (source, ms, state) for r, source, ms, state in (results.get(timeout=120) for _ in procs)}
        events[2].set()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()
    assert got[0][0] == "snapshot"  # group 0 served its memory snapshot
    assert got[1][1] is not None
    print(f"healing quorum (fetch included) took {got[1][1]:.0f} ms")
    assert_same(got[0][2], got[1][2])


def test_two_processes_serve_a_memory_snapshot_bit_exact(tmp_path, shm):
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=cases.serve_snapshot, args=(str(tmp_path / "ckpt"), shm, 5, results, stop))
    proc.start()
    try:
        address, source, sent = results.get(timeout=60)
        receiver = StashpointTransport(timeout=SHORT)
        started = time.perf_counter()
        got = receiver.recv_checkpoint(0, address, 5, timedelta(seconds=30))
        print(f"received the state in {time.perf_counter() - started:.3f}s")
        receiver.shutdown()
    finally:
        stop.set()
        proc.join(60)
    assert proc.exitcode == 0
    assert source == "snapshot"
    assert_same({"user": {"default": sent}, "torchft": {"step": 5}}, got)
    assert got["user"]["default"]["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again


def test_a_rank_of_an_initialised_world_copies_without_a_collective(tmp_path, shm):
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=cases.copy_in_a_world, args=(r, init, shm, results, stop)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        address, source, sent = results.get(timeout=90)
        receiver = StashpointTransport(timeout=SHORT)
        got = receiver.recv_checkpoint(0, address, 2, timedelta(seconds=30))
        receiver.shutdown()
    finally:
        stop.set()
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert source == "copy"
    assert_same(sent, got)


def test_copy_when_no_snapshot_covers_the_step_and_the_copy_is_removed(shm):
    state = {"user": {"default": cases.trained_state(1, 3)}, "torchft": {"step": 9, "batches_committed": 18}}
    sender, receiver = StashpointTransport(timeout=SHORT), StashpointTransport(timeout=SHORT)
    try:
        sender.send_checkpoint([1], 9, state, SHORT)
        assert sender.last_source == "copy" and len(os.listdir(shm)) == 1
        assert_same(state, receiver.recv_checkpoint(0, sender.metadata(), 9, SHORT))
        sender.disallow_checkpoint()
        assert os.listdir(shm) == []
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_a_damaged_chunk_is_refused(shm):
    sender, receiver = StashpointTransport(timeout=SHORT), StashpointTransport(timeout=SHORT)
    try:
        sender.send_checkpoint([1], 1, {"w": torch.arange(4096, dtype=torch.float32)}, SHORT)
        ckpt = os.path.join(shm, os.listdir(shm)[0], "ckpt")
        data = next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.startswith("data"))
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) - 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ChecksumMismatchError):
            receiver.recv_checkpoint(0, sender.metadata(), 1, SHORT)
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_a_value_json_cannot_hold_is_refused_not_pickled():
    sender = StashpointTransport(timeout=SHORT)
    try:
        with pytest.raises(InvalidStateError, match="sched"):
            sender.send_checkpoint([1], 1, {"sched": object(), "w": torch.ones(2)}, SHORT)
    finally:
        sender.shutdown()


def test_a_step_that_is_never_sent_times_out(shm):
    sender, receiver = StashpointTransport(timeout=timedelta(seconds=1)), StashpointTransport(timeout=SHORT)
    try:
        sender.send_checkpoint([1], 4, {"w": torch.ones(3)}, SHORT)
        started = time.perf_counter()
        with pytest.raises(PeerTimeoutError, match="step/5"):
            receiver.recv_checkpoint(0, sender.metadata(), 5, timedelta(seconds=5))
        assert time.perf_counter() - started < 4
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_an_unreachable_peer_is_a_named_error():
    sender = StashpointTransport(timeout=SHORT)
    address = sender.metadata()
    sender.shutdown()
    receiver = StashpointTransport(timeout=SHORT)
    try:
        with pytest.raises(PeerTransferError, match="cannot reach"):
            receiver.recv_checkpoint(0, address, 1, SHORT)
    finally:
        receiver.shutdown()


def test_a_malformed_manifest_is_a_named_error(tmp_path):
    server = PeerServer(timeout_s=2)
    receiver = StashpointTransport(timeout=SHORT)
    try:
        server.publish(Published(step=1, directory=str(tmp_path), files=frozenset(), manifest=b'{"kind": 1}'))
        with pytest.raises(PeerTransferError, match="not a stashpoint torchft manifest of step 1"):
            receiver.recv_checkpoint(0, server.address, 1, SHORT)
    finally:
        server.close()
        receiver.shutdown()
