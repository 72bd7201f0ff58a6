"""The records a save passes from its plan to its index, one type per concept.

A chunk goes through three stages, and each has its own record:

* :class:`Chunk`: what is to be written (which item, which piece of it, its bytes'
  dtype and size).  Plain data, so it crosses the pipe to the writer process.
* :class:`FileItem`: a chunk plus how to produce its bytes now; it exists only in the
  process that writes the data file (the trainer for a sync save, the writer process
  for an async one, the import or merge for their outputs).
* :class:`Written`: a chunk after it was written: where its bytes sit in which file,
  with their checksums (a :class:`~stashpoint.format.index.ChunkRecord`, the on-disk
  record).

A value stored inline in the index is an :class:`Inline`; what a rank contributes to
the index is a list of :data:`Contribution`.  The plan's own records (``ItemPlan``,
``WriteItem``) and the index's (``TensorRecord``, ``ChunkRecord``...) belong to
``planning`` and ``format``; only :mod:`~stashpoint.engine.publish` builds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stashpoint.format.dtypes import dtype_from_name
from stashpoint.format.index import ChunkRecord, FragmentRef
from stashpoint.format.safetensors_file import FileEntry
from stashpoint.vocab import Encoding


@dataclass(frozen=True)
class EncodedValue:
    """A non-tensor value ready to store: JSON text (inline in the index) or pickle bytes."""

    encoding: Encoding
    payload: bytes

    @property
    def inline(self) -> bool:
        return self.encoding == "json"


#: what a rank writes an item from: its local tensor, or an encoded value
Source = torch.Tensor | EncodedValue


@dataclass(frozen=True)
class Chunk:
    """One chunk of a data file, as planned.

    ``dtype`` is the index dtype name of a tensor chunk; ``""`` marks the bytes of a
    pickled value (stored as a flat uint8 entry).  ``offsets`` place the chunk in the
    global tensor (``(0,)`` for a value).
    """

    fqn: str
    per_rank: bool
    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @property
    def entry(self) -> FileEntry:
        """The chunk as a safetensors entry."""
        dtype = dtype_from_name(self.dtype) if self.dtype else torch.uint8
        return FileEntry(key=self.key, dtype=dtype, shape=self.shape, nbytes=self.nbytes)

    def with_key(self, key: str) -> Chunk:
        return dataclasses.replace(self, key=key)


@dataclass(frozen=True)
class FileItem:
    """A :class:`Chunk` and how to produce its bytes, when the writer reaches it."""

    chunk: Chunk
    fetch: Callable[[], memoryview]


@dataclass(frozen=True)
class Written:
    """A chunk after it was written: its item, its dtype and its on-disk record."""

    fqn: str
    per_rank: bool
    dtype: str  # "" for pickled value bytes
    record: ChunkRecord


@dataclass(frozen=True)
class Inline:
    """A JSON value a rank contributes to the index itself (it is in no data file)."""

    fqn: str
    per_rank: bool
    json_text: str


#: one entry of what a rank contributes to the index; a :class:`FragmentRef` names the
#: index fragment that holds the rank's chunks of grid tensors
Contribution = Written | Inline | FragmentRef


def contribution_to_json(c: Contribution) -> dict:
    """For the manifests ranks' writers exchange through storage (never in a checkpoint)."""
    if isinstance(c, Inline):
        return {"fqn": c.fqn, "per_rank": c.per_rank, "json_text": c.json_text}
    if isinstance(c, FragmentRef):
        return {"fragment_ref": dataclasses.asdict(c)}
    return {"fqn": c.fqn, "per_rank": c.per_rank, "dtype": c.dtype, "record": dataclasses.asdict(c.record)}


def contribution_from_json(d: dict) -> Contribution:
    if "json_text" in d:
        return Inline(fqn=d["fqn"], per_rank=d["per_rank"], json_text=d["json_text"])
    if "fragment_ref" in d:
        return FragmentRef(**d["fragment_ref"])
    r = d["record"]
    record = ChunkRecord(
        offsets=tuple(r["offsets"]),
        shape=tuple(r["shape"]),
        file=r["file"],
        key=r["key"],
        byte_range=tuple(r["byte_range"]),
        crc32c=tuple(r["crc32c"]),
    )
    return Written(fqn=d["fqn"], per_rank=d["per_rank"], dtype=d["dtype"], record=record)
