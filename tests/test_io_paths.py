"""Early writeback in the local writer, and per-tensor reads for early device copies.

Both are performance paths whose effect only shows on real disks and GPUs; these
tests (CPU only) check that they change no bytes and keep the failure guarantees.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading

import pytest
import torch

import stashpoint
from stashpoint import errors
from stashpoint.engine import load as load_mod
from stashpoint.engine import ranged
from stashpoint.engine.reader import CheckpointReader
from stashpoint.engine.save import save_state
from stashpoint.engine.tensors import full_box
from stashpoint.format.index import TensorRecord
from stashpoint.planning.layout import Box
from stashpoint.planning.read_plan import plan_chunk_reads
from stashpoint.storage import local
from stashpoint.storage.local import LocalStorage, _FileWriter

MiB = 1 << 20

_SFR_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _recording_sfr(monkeypatch, result: int | None = None) -> list[tuple[int, int, int]]:
    """Replace sync_file_range by a ctypes function that records its calls.

    It returns ``result``, or (``None``) passes the call on to the real libc function.
    """
    real = local._sync_file_range()
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def fake(fd, offset, nbytes, flags):
        with lock:
            calls.append((offset, nbytes, flags))
        if result is not None:
            return result
        return real(fd, offset, nbytes, flags) if real is not None else 0

    fn = _SFR_TYPE(fake)
    monkeypatch.setattr(local, "_SYNC_FILE_RANGE", [fn])
    return calls


# --- early writeback ----------------------------------------------------------------------------


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="sync_file_range is Linux only")
def test_libc_has_sync_file_range(tmp_path):
    fn = local._sync_file_range()
    assert fn is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 4096)
        assert fn(fd, 0, 4096, local._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("result", [None, -1], ids=["real", "fails"])
def test_save_of_40_mib_round_trips(tmp_path, monkeypatch, result):
    calls = _recording_sfr(monkeypatch, result)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10 * MiB, generator=g)  # 40 MiB of float32
    path = str(tmp_path / "ckpt")
    stashpoint.save({"w": w, "small": torch.arange(10)}, path)
    assert calls, "no write was large enough to start early writeback"
    assert all(
        flags == local._SYNC_FILE_RANGE_WRITE and n >= local._EARLY_WRITEBACK_MIN for _, n, flags in calls
    )
    # the ranges are disjoint
    spans = sorted((off, off + n) for off, n, _ in calls)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    got = stashpoint.load_full(path)
    assert _bits(got["w"]) == _bits(w)
    assert torch.equal(got["small"], torch.arange(10))


def test_save_without_sync_file_range(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "_SYNC_FILE_RANGE", [None])
    w = torch.randn(3 * MiB)
    path = str(tmp_path / "ckpt")
    stashpoint.save({"w": w}, path)
    assert _bits(stashpoint.load_full(path)["w"]) == _bits(w)


def test_sequential_writes_name_their_own_ranges(tmp_path, monkeypatch):
    calls = _recording_sfr(monkeypatch)
    pieces = [os.urandom(9 * MiB), os.urandom(MiB), os.urandom(8 * MiB), b"tail"]
    p = str(tmp_path / "f")
    w = LocalStorage().open_writer(p)
    for piece in pieces:
        w.write(piece)
    w.close()
    assert [(off, n) for off, n, _ in calls] == [(0, 9 * MiB), (10 * MiB, 8 * MiB)]
    with open(p, "rb") as f:
        assert f.read() == b"".join(pieces)


def test_positional_writes_from_threads(tmp_path, monkeypatch):
    calls = _recording_sfr(monkeypatch, -1)
    size, step = 80 * MiB + 5, 8 * MiB
    data = os.urandom(size)
    p = str(tmp_path / "f")
    w = _FileWriter(p, size)
    threads = [
        threading.Thread(target=w.write_at, args=(lo, memoryview(data)[lo : lo + step]))
        for lo in range(0, size, step)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    assert sorted((off, n) for off, n, _ in calls) == [(lo, step) for lo in range(0, 80 * MiB, step)]
    with open(p, "rb") as f:
        assert f.read() == data


# --- per-tensor reads and early copies ------------------------------------------------------------


@pytest.fixture
def split_ckpt(tmp_path):
    """A checkpoint of tensors saved in halves, plus records that see each as one tensor."""
    g = torch.Generator().manual_seed(5)
    full = {
        "a": torch.randn(64, 1000, generator=g),
        "b": torch.randint(-(2**31), 2**31 - 1, (50, 333), generator=g, dtype=torch.int32),
        "c": torch.randn(3, 7, generator=g).to(torch.bfloat16),
    }
    halves = {}
    for k, t in full.items():
        cut = t.shape[0] // 2
        halves[f"{k}.0"], halves[f"{k}.1"] = t[:cut].clone(), t[cut:].clone()
    path = str(tmp_path / "split")
    stashpoint.save(halves, path)
    index = stashpoint.read_index(path)
    records = {}
    for k, t in full.items():
        (c0,) = index.items[f"{k}.0"].chunks
        (c1,) = index.items[f"{k}.1"].chunks
        c1 = dataclasses.replace(c1, offsets=(t.shape[0] // 2, 0))
        records[k] = TensorRecord(index.items[f"{k}.0"].dtype, tuple(t.shape), (c0, c1))
    return path, index, full, records


def _plan(records, full, index, boxes_of):
    reads, staged = {}, {}
    for k, rec in records.items():
        t = full[k]
        boxes, local_shape = boxes_of(t)
        reads[k] = plan_chunk_reads(rec.chunks, boxes, t.element_size(), index.crc_block_bytes)
        staged[k] = torch.empty(local_shape, dtype=t.dtype)
    return reads, staged


def _whole(t):
    return full_box(tuple(t.shape)), tuple(t.shape)


def _middle_columns(t):
    # all but the last row of columns 2..5: a strided part that crosses both chunks
    rows, cols = t.shape[0] - 1, 3
    return [Box((0, 2), (rows, cols), (0, 0))], (rows, cols)


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("boxes_of", [_whole, _middle_columns], ids=["whole", "part"])
def test_per_tensor_reads_match_execute_reads(split_ckpt, threads, boxes_of):
    path, index, full, records = split_ckpt
    storage = LocalStorage()
    reads, expected = _plan(records, full, index, boxes_of)
    assert all(len(rs) == 2 for rs in reads.values())
    jobs = [(k, r, expected[k]) for k, rs in reads.items() for r in rs]
    reader = CheckpointReader(storage, path)
    n_old = reader.read_chunks(jobs)

    _, staged = _plan(records, full, index, boxes_of)
    finished: list[str] = []
    lock = threading.Lock()

    def finish(fqn, host):
        # every read of this tensor is done: the buffer is already complete
        assert _bits(host) == _bits(expected[fqn])
        with lock:
            finished.append(fqn)
        return host.clone()  # stands in for the copy to the device

    n_new = reader.read_per_tensor(reads, staged, finish, threads=threads)
    assert n_new == n_old
    assert sorted(finished) == sorted(reads)
    for k in reads:
        assert _bits(staged[k]) == _bits(expected[k])


def test_per_tensor_reads_finish_tensors_without_reads(split_ckpt):
    path, index, _, _ = split_ckpt
    staged = {"e": torch.empty(0, 4)}
    finished = []
    reader = CheckpointReader(LocalStorage(), path, verify=False)
    n = reader.read_per_tensor({"e": ()}, staged, lambda f, h: finished.append(f) or h)
    assert n == 0 and finished == ["e"]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(256, 1000, generator=g),
        "b": torch.randn(100, 100, generator=g).to(torch.float16),
        "n": torch.randint(0, 100, (40,), generator=g),
        "z": torch.randn(300, 500, generator=g),
        "step": 17,
    }


def _snapshot(state: dict) -> dict:
    return {k: _bits(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


@pytest.fixture
def forced_bounce(monkeypatch):
    """Reads for CPU targets go through the bounce buffer, as reads for a GPU do, in
    pieces smaller than a tensor; returns the reads that took that path."""
    seen: list[str] = []
    real = ranged._read_to_device

    def spy(storage, file_path, where, fqn, read, target, crc_block):
        seen.append(fqn)
        return real(storage, file_path, where, fqn, read, target, crc_block)

    monkeypatch.setattr(ranged, "through_bounce", lambda t: True)
    monkeypatch.setattr(ranged, "BOUNCE_BYTES", 64 << 10)
    monkeypatch.setattr(ranged, "_read_to_device", spy)
    return seen


def test_bounce_path_loads_the_same_bits(tmp_path, forced_bounce):
    path = str(tmp_path / "ckpt")
    saved = _state(1)
    save_state(saved, path, crc_block_bytes=16 << 10)
    target = _state(2)
    result = stashpoint.load(target, path)
    assert _snapshot(target) == _snapshot(saved)
    assert sorted(forced_bounce) == ["a", "b", "n", "z"]
    assert result.bytes_loaded == sum(
        t.numel() * t.element_size() for t in saved.values() if torch.is_tensor(t)
    )


def test_checksum_error_in_one_tensor_leaves_every_target_unchanged(tmp_path, forced_bounce):
    path = str(tmp_path / "ckpt")
    save_state(_state(1), path, crc_block_bytes=16 << 10)
    # damage one byte in the middle of "z"
    chunk = stashpoint.read_index(path).items["z"].chunks[0]
    lo, hi = chunk.byte_range
    with open(os.path.join(path, chunk.file), "r+b") as f:
        f.seek((lo + hi) // 2)
        b = f.read(1)
        f.seek((lo + hi) // 2)
        f.write(bytes([b[0] ^ 0x10]))
    target = _state(2)
    before = _snapshot(target)
    with pytest.raises(errors.ChecksumMismatchError, match="'z'"):
        stashpoint.load(target, path)
    assert _snapshot(target) == before  # the bounce path ran, yet no target was written
    assert "z" in forced_bounce


def test_no_early_copies_for_cpu_targets(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    stashpoint.save(_state(1), path)
    seen = {}
    real = load_mod._early_copy_devices

    def spy(plan, flat):
        seen["devices"] = real(plan, flat)
        return seen["devices"]

    monkeypatch.setattr(load_mod, "_early_copy_devices", spy)
    target = _state(2)
    stashpoint.load(target, path)
    assert seen["devices"] == {}
    assert _snapshot(target) == _snapshot(_state(1))
