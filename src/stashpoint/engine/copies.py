"""What a rank copies into host staging memory, and the copies queued.

A save (or a memory snapshot) stages the chunks of its plan into one host buffer at
known offsets: :func:`pieces_of` lists them, :func:`copy_pairs` builds the destination
views and source regions per device (values' bytes are written at once), and
:func:`run_copies` queues them on each device's copy engine, one batch per engine.
The byte ranges each device fills alone are merged into runs, so an engine that stages
through a device buffer moves them to the host in a few large copies instead of one
per tensor (:meth:`~stashpoint.engine.staging.CudaCopyEngine.copy_into`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stashpoint.engine.prepare import chunk_of
from stashpoint.engine.records import Chunk, Source
from stashpoint.engine.staging import (
    CopyEngine,
    CudaCopyEngine,
    DeviceCopies,
    InlineCopyEngine,
    Ticket,
    align,
    merged_runs,
)
from stashpoint.engine.tensors import region
from stashpoint.planning.save_plan import WriteItem


@dataclass(frozen=True)
class Piece:
    """A chunk this rank stages: the plan's write, where its bytes come from, the chunk."""

    write: WriteItem
    source: Source
    chunk: Chunk


def pieces_of(writes: tuple[WriteItem, ...], sources: dict[str, Source]) -> list[Piece]:
    out = []
    for w in writes:
        chunk = chunk_of(w, sources[w.fqn])
        if chunk is not None:  # inline JSON values travel in the job itself
            out.append(Piece(write=w, source=sources[w.fqn], chunk=chunk))
    return out


def copy_in(
    buffer: torch.Tensor,
    pieces: list[Piece],
    offsets: list[int],
    copy_engine: CopyEngine | None,
    device_buffer: bool,
) -> list[Ticket]:
    """Queue the copies of every piece into ``buffer`` (bytes) at ``offsets``; a ticket per engine."""
    return run_copies(copy_pairs(buffer, pieces, offsets), copy_engine, device_buffer)


@dataclass(frozen=True)
class CopyPairs:
    """Destination views and source regions of a staging, grouped by source device.

    Building the views costs microseconds a tensor: a memory snapshot, whose plan and
    tensors rarely change, builds them once and reuses them (:func:`run_copies`).
    """

    host: torch.Tensor  # the staging buffer (bytes)
    by_device: dict[torch.device, DeviceCopies]
    device_bytes: dict[torch.device, int]  # device-buffer bytes a mirrored staging needs


def copy_pairs(
    buffer: torch.Tensor, pieces: list[Piece], offsets: list[int], others: tuple[tuple[int, int], ...] = ()
) -> CopyPairs:
    """Views of ``buffer`` for every tensor piece (objects' bytes are copied now).

    ``others``: ``[start, end)`` ranges of ``buffer`` written apart from ``pieces`` (values
    a caller copies itself); a run of copies never spans one.
    """
    lists: dict[torch.device, tuple[list, list, list]] = {}
    owners: list[tuple[int, int, torch.device | None]] = [(a, b, None) for a, b in others]
    for p, off in zip(pieces, offsets, strict=True):
        dst = buffer[off : off + p.chunk.nbytes]
        src = p.source
        if not isinstance(src, torch.Tensor):
            dst.copy_(torch.frombuffer(bytearray(src.payload), dtype=torch.uint8))
            owners.append((off, off + p.chunk.nbytes, None))
            continue
        box = p.write.box
        dsts, srcs, offs = lists.setdefault(src.device, ([], [], []))
        dsts.append(dst.view(src.dtype).view(box.shape))
        srcs.append(region(src, box.local_offsets, box.shape))
        offs.append(off)
        owners.append((off, off + p.chunk.nbytes, src.device))
    runs = merged_runs(owners)
    by_device = {
        device: DeviceCopies(dsts=d, srcs=s, offsets=o, runs=runs.get(device, ()))
        for device, (d, s, o) in lists.items()
    }
    device_bytes = {device: align(c.span) for device, c in by_device.items() if device.type == "cuda"}
    return CopyPairs(host=buffer, by_device=by_device, device_bytes=device_bytes)


def run_copies(pairs: CopyPairs, copy_engine: CopyEngine | None, device_buffer: bool) -> list[Ticket]:
    """Queue every copy of ``pairs``: one batch per engine; returns a ticket per engine."""
    tickets = []
    for device, copies in pairs.by_device.items():
        engine = copy_engine or engine_for(device, {}, device_buffer)
        if isinstance(engine, CudaCopyEngine):
            engine.reserve(pairs.device_bytes.get(device, 0))
        engine.begin()
        engine.copy_into(pairs.host, copies)
        tickets.append(engine.finish())
    return tickets


_CUDA_ENGINES: dict[tuple[torch.device, bool], CudaCopyEngine] = {}


def engine_for(device: torch.device, engines: dict | None = None, device_buffer: bool = False) -> CopyEngine:
    """The copy engine for tensors on ``device`` (one per CUDA device, reused)."""
    if engines and device in engines:
        return engines[device]
    if device.type == "cuda":
        # one engine per device for the life of the process: its stream and buffer are reused
        key = (device, device_buffer)
        if key not in _CUDA_ENGINES:
            _CUDA_ENGINES[key] = CudaCopyEngine(device, device_buffer=device_buffer)
        return _CUDA_ENGINES[key]
    return InlineCopyEngine()
