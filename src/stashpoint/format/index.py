"""The JSON index of a checkpoint.

The index is the only metadata a checkpoint has.  It is plain JSON (never pickle),
written last, and its presence is what makes a directory a committed checkpoint.
``Index.to_json`` / ``Index.from_json`` are the only places that know the field
names; everything else in stashpoint works with the dataclasses of
:mod:`stashpoint.format.records`.  Since format version 2 the index carries a
SHA-256 of its own bytes (:mod:`stashpoint.format.index_json`), checked on every read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from stashpoint.errors import IndexCorruptError, UnsupportedFormatVersionError
from stashpoint.format.fragment import GridChunks
from stashpoint.format.grid import TensorGrid
from stashpoint.format.index_json import CHECKSUM_MEMBER, check_seal, parse_strict, seal
from stashpoint.format.index_parse import IndexParser
from stashpoint.format.records import (
    ChunkRecord,
    FragmentRef,
    Item,
    Layout,
    NameLayout,
    ObjectRecord,
    PerRankRecord,
    Record,
    SaveMetadata,
    TensorRecord,
    chunks_of,
    records_of,
)
from stashpoint.format.values import JSONValue

__all__ = [
    "DEFAULT_CRC_BLOCK_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "READABLE_VERSIONS",
    "ChunkRecord",
    "FragmentRef",
    "Index",
    "Item",
    "JSONValue",
    "Layout",
    "NAMES_VERSION",
    "NameLayout",
    "ObjectRecord",
    "PerRankRecord",
    "Record",
    "SaveMetadata",
    "TensorRecord",
    "expand_index",
    "iter_chunks",
    "layout_to_json",
]

FORMAT_NAME = "stashpoint"
#: version 2 added the index checksum (version 1 indexes are still read, unverified);
#: version 3 added tensor grids and index fragments
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
INDEX_FILE = "index.json"
#: version of the optional ``metadata.names`` member (its own, beside the format's)
NAMES_VERSION = 1
DEFAULT_CRC_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Index:
    metadata: SaveMetadata
    items: dict[str, Item]
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES
    format_version: int = FORMAT_VERSION
    #: True when read from a file whose index checksum matched; False for a version 1
    #: index (which has none) and for indexes built in memory (never read from a file)
    checksum_verified: bool = field(default=False, compare=False)
    #: version 3: the index fragment of each saving rank (None where it wrote none)
    fragments: tuple[FragmentRef | None, ...] = ()

    @property
    def files(self) -> list[str]:
        """Every data file the index names."""
        named = {c.file for rec in records_of(self.items.values()) for c in chunks_of(rec)}
        return sorted(named | {ref.file for ref in self.fragments if ref is not None})

    @property
    def compact(self) -> bool:
        """Some tensor is described by a grid: its chunks are listed in the fragments."""
        return any(isinstance(i, TensorRecord) and i.grid is not None for i in self.items.values())

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def to_json(self) -> str:
        """The bytes of ``index.json`` (as text), sealed with its checksum from version 2 on."""
        meta = {
            "world_size": self.metadata.world_size,
            "created_unix": self.metadata.created_unix,
            "step": self.metadata.step,
            "torch_version": self.metadata.torch_version,
            "stashpoint_version": self.metadata.stashpoint_version,
            "user": self.metadata.user,
            "save_id": self.metadata.save_id,
        }
        if self.metadata.layouts:  # optional: absent when no rank renumbered anything
            meta["names"] = _names_to_json(self.metadata.layouts)
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "crc_block_bytes": self.crc_block_bytes,
            "metadata": meta,
            "items": {name: _item_to_json(item) for name, item in sorted(self.items.items())},
        }
        if self.format_version >= 3:
            refs = self.fragments or (None,) * self.metadata.world_size
            doc["fragments"] = [_fragment_ref_to_json(r) for r in refs]
        body = json.dumps(doc, indent=1, allow_nan=False)
        return body if self.format_version < 2 else seal(body)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Index:
        """Check, parse and validate an index; ``where`` names the checkpoint in errors.

        Raises IndexCorruptError (the checksum does not match, or anything breaks the
        format) or UnsupportedFormatVersionError.  Nothing else.
        """
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        sealed = check_seal(raw, where)  # before believing any byte of it
        doc = parse_strict(raw, where)
        p = IndexParser(where)
        p.expect(isinstance(doc, dict), "index", "a JSON object")
        p.expect(doc.get("format") == FORMAT_NAME, "format", f'"{FORMAT_NAME}"')
        version = doc.get("format_version")
        p.expect(type(version) is int, "format_version", "an integer")
        if version not in READABLE_VERSIONS:
            raise UnsupportedFormatVersionError(
                f"{where}: format_version {version} is not supported "
                f"(this stashpoint reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        if not sealed and (version >= 2 or CHECKSUM_MEMBER in doc):
            raise IndexCorruptError(
                f"{where}: index field {CHECKSUM_MEMBER!r} must end the file, as FORMAT.md §3.1 "
                "writes it (it is missing or was damaged)"
            )
        p.version = version
        parsed = p.document(doc)
        return cls(
            metadata=parsed.metadata,
            items=parsed.items,
            crc_block_bytes=parsed.block,
            format_version=version,
            checksum_verified=sealed,
            fragments=parsed.fragments,
        )

    def grid_chunks(
        self, load: Callable[[FragmentRef], bytes], where: str, whole: bool = False
    ) -> GridChunks:
        """The reader of this index's grid chunks, fragments read through ``load``; with
        ``whole``, every entry of a fragment read is checked at once, else when used."""
        meta = (self.metadata.save_id, self.crc_block_bytes)
        return GridChunks(self.items, self.fragments, meta, load, where, whole)


def expand_index(index: Index, load: Callable[[FragmentRef], bytes], where: str) -> Index:
    """``index`` with every grid tensor's chunks listed (every fragment is read and checked)."""
    if not index.compact:
        return index
    grids = index.grid_chunks(load, where, whole=True)
    items: dict[str, Item] = {}
    for name, item in index.items.items():
        is_grid = isinstance(item, TensorRecord) and item.grid is not None
        items[name] = grids.expanded(name, item) if is_grid else item
    grids.check_complete()
    return replace(index, items=items)


def iter_chunks(index: Index) -> Iterator[tuple[str, ChunkRecord]]:
    """Every (item name, chunk) pair of the index, per-rank items included."""
    for name, item in index.items.items():
        for rec in records_of([item]):
            for chunk in chunks_of(rec):
                yield name, chunk


def layout_to_json(n: NameLayout) -> dict:
    """One entry of ``metadata.names.layouts`` (docs/FORMAT.md §3.2)."""
    return {
        "rank": n.rank,
        "prefix": n.prefix,
        "kind": n.kind,
        "key": n.key,
        "global_ids": list(n.global_ids),
    }


def _names_to_json(layouts: tuple[NameLayout, ...]) -> dict:
    return {"version": NAMES_VERSION, "layouts": [layout_to_json(n) for n in layouts]}


def _chunk_to_json(c: ChunkRecord) -> dict:
    return {
        "offsets": list(c.offsets),
        "shape": list(c.shape),
        "file": c.file,
        "key": c.key,
        "byte_range": list(c.byte_range),
        "crc32c": list(c.crc32c),
    }


def _fragment_ref_to_json(ref: FragmentRef | None) -> dict | None:
    if ref is None:
        return None
    return {"file": ref.file, "fragment": ref.fragment, "sha256": ref.sha256, "bytes": ref.size}


def _grid_to_json(grid: TensorGrid) -> dict:
    return {
        "splits": [list(s) for s in grid.splits],
        "file_first": grid.first,
        "file_steps": [list(s) for s in grid.steps],
        "file_exceptions": [list(e) for e in grid.exceptions],
    }


def _record_to_json(rec: Record) -> dict:
    if isinstance(rec, TensorRecord):
        out: dict = {"kind": "tensor", "dtype": rec.dtype, "shape": list(rec.shape)}
        if rec.grid is not None:
            out["grid"] = _grid_to_json(rec.grid)
        else:
            out["chunks"] = [_chunk_to_json(c) for c in rec.chunks]
        if rec.layout is not None:
            names = rec.layout.mesh_dim_names
            out["layout"] = {
                "mesh_shape": list(rec.layout.mesh_shape),
                "mesh_dim_names": None if names is None else list(names),
                "placements": list(rec.layout.placements),
            }
        return out
    out = {"kind": "object", "encoding": rec.encoding}
    if rec.encoding == "json":
        out["value"] = rec.value
    else:
        out["chunk"] = _chunk_to_json(rec.chunk)
    return out


def _item_to_json(item: Item) -> dict:
    if isinstance(item, PerRankRecord):
        return {"kind": "per_rank", "ranks": [_record_to_json(r) for r in item.ranks]}
    return _record_to_json(item)
