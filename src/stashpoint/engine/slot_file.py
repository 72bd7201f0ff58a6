"""A memory snapshot's slot file: where each chunk lies, and the copies that fill it.

A slot is a whole safetensors data file in shared memory.  :func:`slot_shape` lays it
out for a save plan (widest elements first, so every tensor starts at an offset its
element size divides and the slot can be viewed as tensors); :class:`SlotViews` keeps
the copy views of each slot, built once and reused while every source tensor keeps
its memory (:func:`addresses`).  Stored values (pickled objects) are written again at
every snapshot, since only their bytes, not their place, can change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stashpoint.engine.copies import CopyPairs, Piece, copy_pairs, pieces_of
from stashpoint.engine.persist import unique_keys
from stashpoint.engine.records import Chunk, FileItem
from stashpoint.format.safetensors_file import FileLayout, layout_file
from stashpoint.planning.save_plan import SavePlan, WriteItem

#: the data file's safetensors metadata
SLOT_METADATA = {"format": "pt", "writer": "stashpoint"}


@dataclass(frozen=True, kw_only=True)
class SlotShape:
    """What a plan makes of this rank's slot file: the chunks and where they lie."""

    plan: SavePlan
    writes: tuple[WriteItem, ...]
    parts: tuple[tuple[WriteItem, Chunk], ...]  # what each piece writes (not its source)
    chunks: tuple[Chunk, ...]
    layout: FileLayout
    object_at: frozenset[int]  # parts whose bytes are a stored value's, written every time

    def fits(self, plan: SavePlan, sources: dict) -> bool:
        """Whether this layout serves ``plan`` and ``sources``: the same plan, and stored
        values of the same encoded sizes (a reused plan does not look at sizes)."""
        if not (self.plan is plan or self.plan == plan):
            return False
        return all(
            len(sources[self.parts[i][0].fqn].payload) == self.parts[i][1].nbytes for i in self.object_at
        )


def slot_shape(plan: SavePlan, rank: int, sources: dict) -> SlotShape:
    """Lay out ``rank``'s slot file for ``plan``."""
    writes = plan.writes[rank]
    pieces = sorted(pieces_of(writes, sources), key=lambda p: -_element_size(p.source))
    keyed = unique_keys([FileItem(chunk=p.chunk, fetch=None) for p in pieces])
    return SlotShape(
        plan=plan,
        writes=writes,
        parts=tuple((p.write, p.chunk) for p in pieces),
        chunks=tuple(it.chunk for it in keyed),
        layout=layout_file([it.chunk.entry for it in keyed], metadata=SLOT_METADATA),
        object_at=frozenset(i for i, p in enumerate(pieces) if not isinstance(p.source, torch.Tensor)),
    )


def addresses(shape: SlotShape, sources: dict, layouts_checked: bool) -> tuple:
    """What cached copies depend on: each tensor's memory, and its view unless the plan
    cache has just checked every tensor's layout (dtype, shape, strides, device)."""
    tensors = [sources[w.fqn] for i, (w, _) in enumerate(shape.parts) if i not in shape.object_at]
    if layouts_checked:
        return tuple(t.data_ptr() for t in tensors)
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device) for t in tensors)


@dataclass
class SlotViews:
    """Copy views per slot, reused while every source tensor keeps its memory."""

    addresses: tuple
    by_slot: dict[tuple[int, int], CopyPairs] = field(default_factory=dict)

    def copies(self, shape: SlotShape, key: tuple[int, int], buf: torch.Tensor, sources: dict) -> CopyPairs:
        """Write the header and the stored values into ``buf`` now; the tensors' copies
        into it, built on the first use of slot ``key``."""
        buf[: len(shape.layout.header)].copy_(
            torch.frombuffer(bytearray(shape.layout.header), dtype=torch.uint8)
        )
        ranges = shape.layout.ranges
        objects = [_piece(shape, i, sources) for i in sorted(shape.object_at)]
        if objects:
            copy_pairs(buf, [p for p, _ in objects], [off for _, off in objects])
        if key not in self.by_slot:
            tensors = [_piece(shape, i, sources) for i in range(len(ranges)) if i not in shape.object_at]
            written = tuple((off, off + p.chunk.nbytes) for p, off in objects)  # never inside a run
            self.by_slot[key] = copy_pairs(buf, [p for p, _ in tensors], [off for _, off in tensors], written)
        return self.by_slot[key]


def _piece(shape: SlotShape, i: int, sources: dict) -> tuple[Piece, int]:
    write, chunk = shape.parts[i]
    return Piece(write=write, source=sources[write.fqn], chunk=chunk), shape.layout.ranges[i][0]


def _element_size(source: object) -> int:
    return source.element_size() if isinstance(source, torch.Tensor) else 1
