"""Staging copies: runs of a buffer filled by one device, and the copies they stand for."""

from __future__ import annotations

import torch

from stashpoint.engine.copies import Piece, copy_pairs, run_copies
from stashpoint.engine.records import Chunk, EncodedValue
from stashpoint.engine.staging import DeviceCopies, merged_runs
from stashpoint.planning.layout import Box
from stashpoint.planning.save_plan import WriteItem


def test_runs_merge_neighbours_of_one_owner_across_padding():
    owners = [(0, 10, "a"), (16, 20, "a"), (20, 30, None), (32, 40, "a"), (40, 48, "b"), (48, 50, "a")]
    assert merged_runs(owners) == {"a": ((0, 20), (32, 40), (48, 50)), "b": ((40, 48),)}


def test_runs_ignore_empty_ranges_and_order_by_offset():
    owners = [(30, 40, "a"), (10, 10, None), (0, 10, "a"), (10, 20, "a")]
    assert merged_runs(owners) == {"a": ((0, 40),)}  # an empty value splits nothing


def test_span_is_the_end_of_the_last_run():
    assert DeviceCopies(dsts=[], srcs=[], offsets=[], runs=((0, 8), (64, 96))).span == 96
    assert DeviceCopies(dsts=[], srcs=[], offsets=[]).span == 0


def _tensor_piece(name: str, t: torch.Tensor) -> Piece:
    box = Box(offsets=(0,) * t.dim(), shape=tuple(t.shape), local_offsets=(0,) * t.dim())
    chunk = Chunk(
        fqn=name,
        per_rank=False,
        key=name,
        dtype="F32",
        shape=box.shape,
        offsets=box.offsets,
        nbytes=t.numel() * t.element_size(),
    )
    return Piece(write=WriteItem(fqn=name, file_key=name, box=box, per_rank=False), source=t, chunk=chunk)


def _value_piece(name: str, payload: bytes) -> Piece:
    chunk = Chunk(
        fqn=name, per_rank=False, key=name, dtype="", shape=(len(payload),), offsets=(0,), nbytes=len(payload)
    )
    value = EncodedValue(encoding="pickle", payload=payload)
    return Piece(
        write=WriteItem(fqn=name, file_key=name, box=None, per_rank=False), source=value, chunk=chunk
    )


def test_copies_fill_the_buffer_and_values_split_the_runs():
    a, b, c = torch.arange(4.0), torch.arange(6.0) + 10, torch.arange(2.0) + 20
    value = b"pickled!"
    pieces = [_tensor_piece("a", a), _value_piece("v", value), _tensor_piece("b", b), _tensor_piece("c", c)]
    offsets = [0, 16, 24, 48]
    buffer = torch.zeros(64, dtype=torch.uint8)
    pairs = copy_pairs(buffer, pieces, offsets, others=((60, 64),))
    assert bytes(buffer[16:24].tolist()) == value  # values are written at once
    cpu = pairs.by_device[torch.device("cpu")]
    assert cpu.runs == ((0, 16), (24, 56)) and cpu.offsets == [0, 24, 48]
    assert pairs.device_bytes == {}  # no device buffer for host tensors
    for ticket in run_copies(pairs, None, device_buffer=False):
        ticket.wait()
    assert torch.equal(buffer[0:16].view(torch.float32), a)
    assert torch.equal(buffer[24:48].view(torch.float32), b)
    assert torch.equal(buffer[48:56].view(torch.float32), c)
