"""The records an index is made of, as frozen dataclasses (field names: docs/FORMAT.md §3)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Union

from stashpoint.format.grid import TensorGrid
from stashpoint.format.values import JSONValue
from stashpoint.vocab import LayoutKind

#: the closed dtype list of FORMAT.md §2 and each dtype's bytes per element (no torch needed)
INDEX_ITEMSIZE = {
    **dict.fromkeys(("float64", "int64", "uint64", "complex64"), 8),
    **dict.fromkeys(("float32", "int32", "uint32"), 4),
    **dict.fromkeys(("float16", "bfloat16", "int16", "uint16"), 2),
    **dict.fromkeys(("int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2"), 1),
    **dict.fromkeys(("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"), 1),
    "complex128": 16,
}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ChunkRecord:
    """One rectangular piece of a tensor, stored contiguously in one data file.

    ``byte_range`` is absolute within ``file`` (header included), so a reader can
    issue a ranged read without parsing the safetensors header.  ``crc32c`` holds
    one checksum per ``crc_block_bytes`` block of that range, so that a partial read
    can still be verified block by block.
    """

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    file: str
    key: str
    byte_range: tuple[int, int]
    crc32c: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.byte_range[1] - self.byte_range[0]


@dataclass(frozen=True)
class Layout:
    """How a tensor was distributed when it was saved (informational only)."""

    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...] | None
    placements: tuple[str, ...]


@dataclass(frozen=True)
class TensorRecord:
    """A global or per-rank tensor: its chunks listed, or (format 3) described by a grid.

    A record with a ``grid`` has no ``chunks`` of its own: its chunks' byte ranges and
    checksums are in the fragments of their files (:mod:`stashpoint.format.fragment`);
    :func:`stashpoint.format.index.expand_index` lists them.
    """

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    layout: Layout | None = None
    grid: TensorGrid | None = None

    @property
    def nbytes(self) -> int:
        if self.grid is not None:
            return numel(self.shape) * INDEX_ITEMSIZE.get(self.dtype, 0)
        return sum(c.nbytes for c in self.chunks)


@dataclass(frozen=True)
class FragmentRef:
    """An index fragment (format 3): the grid chunks of ``file``, written by ``rank``."""

    rank: int
    file: str
    fragment: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ObjectRecord:
    """A non-tensor value: inline JSON, or pickle bytes stored as a uint8 chunk.

    ``"torch_pickle"`` (a ``torch.save``'d object) appears only in indexes that describe
    other tools' checkpoints in memory, never in a stashpoint index file.
    """

    encoding: str  # "json" | "pickle" | "torch_pickle"
    value: JSONValue = None
    chunk: ChunkRecord | None = None

    @property
    def pickled(self) -> bool:
        """Reading the value needs an unpickler (so the caller must opt in)."""
        return self.encoding in ("pickle", "torch_pickle")

    @property
    def nbytes(self) -> int:
        return self.chunk.nbytes if self.chunk else 0


Record = Union[TensorRecord, ObjectRecord]


@dataclass(frozen=True)
class PerRankRecord:
    """An item whose value differs between ranks: one record per saving rank."""

    ranks: tuple[Record, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)


Item = Union[TensorRecord, ObjectRecord, PerRankRecord]


@dataclass(frozen=True)
class NameLayout:
    """How one rank renumbered one ``nn.ModuleList`` of one top-level entry at save.

    Entry ``i`` of ``key`` under ``prefix`` on ``rank`` was saved as ``global_ids[i]``
    (docs/FORMAT.md §3, ``metadata.names``; docs/LAYOUTS.md).
    """

    rank: int
    prefix: str
    kind: LayoutKind
    key: str
    global_ids: tuple[int, ...]


@dataclass(frozen=True)
class SaveMetadata:
    world_size: int
    created_unix: float
    torch_version: str
    stashpoint_version: str
    step: int | None = None
    user: dict[str, JSONValue] = field(default_factory=dict)
    #: unique per save; lets every rank recognise the index its own save committed
    save_id: str = ""
    #: the layouts the ranks' names were renumbered with (``metadata.names``; empty: none)
    layouts: tuple[NameLayout, ...] = ()


def records_of(items: Iterable[Item]) -> Iterator[Record]:
    """The tensor and object records of ``items``, each rank's record of a per-rank item included."""
    for item in items:
        if isinstance(item, PerRankRecord):
            yield from item.ranks
        else:
            yield item


def chunks_of(rec: Record) -> tuple[ChunkRecord, ...]:
    if isinstance(rec, TensorRecord):
        return rec.chunks
    return (rec.chunk,) if rec.chunk is not None else ()
