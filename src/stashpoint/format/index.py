"""The JSON index of a checkpoint, as frozen dataclasses.

The index is the only metadata a checkpoint has.  It is plain JSON (never pickle),
written last, and its presence is what makes a directory a committed checkpoint.
``Index.to_json`` / ``Index.from_json`` are the only places that know the field
names; everything else in stashpoint works with the dataclasses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Union

from stashpoint.errors import IndexCorruptError, UnsupportedFormatVersionError
from stashpoint.format.itemsizes import ITEMSIZE

FORMAT_NAME = "stashpoint"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DEFAULT_CRC_BLOCK_BYTES = 1 << 20

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]


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
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    layout: Layout | None = None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


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
class SaveMetadata:
    world_size: int
    created_unix: float
    torch_version: str
    stashpoint_version: str
    step: int | None = None
    user: dict[str, JSONValue] = field(default_factory=dict)
    #: unique per save; lets every rank recognise the index its own save committed
    save_id: str = ""


@dataclass(frozen=True)
class Index:
    metadata: SaveMetadata
    items: dict[str, Item]
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES
    format_version: int = FORMAT_VERSION

    @property
    def files(self) -> list[str]:
        names: set[str] = set()
        for rec in _all_records(self.items.values()):
            for chunk in _chunks_of(rec):
                names.add(chunk.file)
        return sorted(names)

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "crc_block_bytes": self.crc_block_bytes,
            "metadata": {
                "world_size": self.metadata.world_size,
                "created_unix": self.metadata.created_unix,
                "step": self.metadata.step,
                "torch_version": self.metadata.torch_version,
                "stashpoint_version": self.metadata.stashpoint_version,
                "user": self.metadata.user,
                "save_id": self.metadata.save_id,
            },
            "items": {name: _item_to_json(item) for name, item in sorted(self.items.items())},
        }
        return json.dumps(doc, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Index:
        """Parse and validate an index; ``where`` names the checkpoint in errors."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IndexCorruptError(f"{where}: index is not valid JSON ({exc})") from None
        p = _Parser(where)
        p.expect(isinstance(doc, dict), "index", "a JSON object")
        p.expect(doc.get("format") == FORMAT_NAME, "format", f'"{FORMAT_NAME}"')
        version = doc.get("format_version")
        p.expect(isinstance(version, int) and not isinstance(version, bool), "format_version", "an integer")
        if version != FORMAT_VERSION:
            raise UnsupportedFormatVersionError(
                f"{where}: format_version {version} is not supported "
                f"(this stashpoint reads version {FORMAT_VERSION})"
            )
        meta = p.obj(doc, "metadata")
        step = meta.get("step")
        ok_step = step is None or (isinstance(step, int) and not isinstance(step, bool))
        p.expect(ok_step, "metadata.step", "an integer or null")
        metadata = SaveMetadata(
            world_size=p.int(meta, "world_size", "metadata"),
            created_unix=float(p.num(meta, "created_unix", "metadata")),
            torch_version=p.str(meta, "torch_version", "metadata"),
            stashpoint_version=p.str(meta, "stashpoint_version", "metadata"),
            step=step,
            user=p.obj(meta, "user", "metadata"),
            save_id=str(meta.get("save_id", "")),
        )
        items = {name: p.item(raw, name) for name, raw in p.obj(doc, "items").items()}
        block = p.int(doc, "crc_block_bytes")
        p.expect(block > 0 and block % 64 == 0, "crc_block_bytes", "a positive multiple of 64")
        for name, item in items.items():
            for i, rec in enumerate(item.ranks if isinstance(item, PerRankRecord) else (item,)):
                p.check_sizes(
                    rec,
                    block,
                    f"items[{name!r}]" + (f".ranks[{i}]" if isinstance(item, PerRankRecord) else ""),
                )
        return cls(metadata=metadata, items=items, crc_block_bytes=block, format_version=version)


def _all_records(items):
    for item in items:
        if isinstance(item, PerRankRecord):
            yield from item.ranks
        else:
            yield item


def _chunks_of(rec: Record) -> tuple[ChunkRecord, ...]:
    if isinstance(rec, TensorRecord):
        return rec.chunks
    return (rec.chunk,) if rec.chunk is not None else ()


def iter_chunks(index: Index):
    """Every (item name, chunk) pair of the index, per-rank items included."""
    for name, item in index.items.items():
        for rec in _all_records([item]):
            for chunk in _chunks_of(rec):
                yield name, chunk


def _chunk_to_json(c: ChunkRecord) -> dict:
    return {
        "offsets": list(c.offsets),
        "shape": list(c.shape),
        "file": c.file,
        "key": c.key,
        "byte_range": list(c.byte_range),
        "crc32c": list(c.crc32c),
    }


def _record_to_json(rec: Record) -> dict:
    if isinstance(rec, TensorRecord):
        out: dict = {
            "kind": "tensor",
            "dtype": rec.dtype,
            "shape": list(rec.shape),
            "chunks": [_chunk_to_json(c) for c in rec.chunks],
        }
        if rec.layout is not None:
            out["layout"] = {
                "mesh_shape": list(rec.layout.mesh_shape),
                "mesh_dim_names": (list(rec.layout.mesh_dim_names) if rec.layout.mesh_dim_names else None),
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


class _Parser:
    """Field-by-field validation that turns any malformation into IndexCorruptError."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, wanted: str):
        raise IndexCorruptError(f"{self.where}: index field {field_name!r} must be {wanted}")

    def expect(self, ok: bool, field_name: str, wanted: str) -> None:
        if not ok:
            self.fail(field_name, wanted)

    def _get(self, d: dict, key: str, ctx: str):
        if not isinstance(d, dict) or key not in d:
            self.fail(f"{ctx}.{key}" if ctx else key, "present")
        return d[key]

    def obj(self, d: dict, key: str, ctx: str = "") -> dict:
        v = self._get(d, key, ctx)
        self.expect(isinstance(v, dict), f"{ctx}.{key}" if ctx else key, "a JSON object")
        return v

    def int(self, d: dict, key: str, ctx: str = "") -> int:
        v = self._get(d, key, ctx)
        ok = isinstance(v, int) and not isinstance(v, bool)
        self.expect(ok, f"{ctx}.{key}" if ctx else key, "an integer")
        return v

    def num(self, d: dict, key: str, ctx: str = "") -> float:
        v = self._get(d, key, ctx)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        self.expect(ok, f"{ctx}.{key}" if ctx else key, "a number")
        return v

    def str(self, d: dict, key: str, ctx: str = "") -> str:
        v = self._get(d, key, ctx)
        self.expect(isinstance(v, str), f"{ctx}.{key}" if ctx else key, "a string")
        return v

    def ints(self, d: dict, key: str, ctx: str, length: int | None = None) -> tuple[int, ...]:
        v = self._get(d, key, ctx)
        ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
        ok = ok and (length is None or len(v) == length)
        self.expect(ok, f"{ctx}.{key}", "a list of non-negative integers")
        return tuple(v)

    def check_sizes(self, rec: Record, block: int, ctx: str) -> None:
        """Byte ranges match shapes and dtypes; one checksum per block."""
        if isinstance(rec, TensorRecord):
            size = ITEMSIZE.get(rec.dtype, 0)
            if not size:
                self.fail(f"{ctx}.dtype", "a known dtype name")
        else:
            size = 1
        for i, c in enumerate(_chunks_of(rec)):
            numel = 1
            for n in c.shape:
                numel *= n
            self.expect(c.nbytes == numel * size, f"{ctx}.chunks[{i}].byte_range", "shape x itemsize long")
            want = max(1, -(-c.nbytes // block))
            self.expect(len(c.crc32c) == want, f"{ctx}.chunks[{i}].crc32c", f"{want} checksums")

    def check_tiling(self, shape: tuple[int, ...], chunks: tuple[ChunkRecord, ...], ctx: str) -> None:
        """The chunks cover every element of the tensor exactly once."""
        numel = 1
        for n in shape:
            numel *= n
        covered = 0
        for c in chunks:
            k = 1
            for n in c.shape:
                k *= n
            covered += k
        self.expect(covered == numel, f"{ctx}.chunks", f"covering all {numel} elements exactly once")
        if len(chunks) <= 256:  # pairwise is cheap here; beyond, volume + unique offsets
            for i, a in enumerate(chunks):
                for b in chunks[i + 1 :]:
                    overlap = all(
                        max(x, y) < min(x + s, y + t)
                        for x, s, y, t in zip(a.offsets, a.shape, b.offsets, b.shape)
                    )
                    self.expect(not overlap, f"{ctx}.chunks", "non-overlapping")
        else:
            self.expect(len({c.offsets for c in chunks}) == len(chunks), f"{ctx}.chunks", "non-overlapping")

    def chunk(self, raw: dict, ctx: str) -> ChunkRecord:
        byte_range = self.ints(raw, "byte_range", ctx, 2)
        name = self.str(raw, "file", ctx)
        plain = name not in ("", ".", "..") and not any(ch in name for ch in "/\\\0")
        self.expect(plain, f"{ctx}.file", "a plain file name inside the checkpoint")
        self.expect(byte_range[0] <= byte_range[1], f"{ctx}.byte_range", "ordered")
        return ChunkRecord(
            offsets=self.ints(raw, "offsets", ctx),
            shape=self.ints(raw, "shape", ctx),
            file=self.str(raw, "file", ctx),
            key=self.str(raw, "key", ctx),
            byte_range=byte_range,
            crc32c=self.ints(raw, "crc32c", ctx),
        )

    def record(self, raw: dict, ctx: str) -> Record:
        self.expect(isinstance(raw, dict), ctx, "a JSON object")
        kind = raw.get("kind")
        if kind == "tensor":
            shape = self.ints(raw, "shape", ctx)
            chunks_raw = self._get(raw, "chunks", ctx)
            self.expect(isinstance(chunks_raw, list), f"{ctx}.chunks", "a list")
            chunks = tuple(self.chunk(c, f"{ctx}.chunks[{i}]") for i, c in enumerate(chunks_raw))
            for i, c in enumerate(chunks):
                ok = len(c.offsets) == len(shape) == len(c.shape) and all(
                    o + s <= g for o, s, g in zip(c.offsets, c.shape, shape)
                )
                self.expect(ok, f"{ctx}.chunks[{i}]", "inside the tensor's shape")
            self.check_tiling(shape, chunks, ctx)
            layout = None
            if raw.get("layout") is not None:
                lr = self.obj(raw, "layout", ctx)
                names = lr.get("mesh_dim_names")
                ok = names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names))
                self.expect(ok, f"{ctx}.layout.mesh_dim_names", "a list of strings or null")
                placements = self._get(lr, "placements", f"{ctx}.layout")
                ok = isinstance(placements, list) and all(isinstance(x, str) for x in placements)
                self.expect(ok, f"{ctx}.layout.placements", "a list of strings")
                layout = Layout(
                    mesh_shape=self.ints(lr, "mesh_shape", f"{ctx}.layout"),
                    mesh_dim_names=tuple(names) if names else None,
                    placements=tuple(placements),
                )
            return TensorRecord(dtype=self.str(raw, "dtype", ctx), shape=shape, chunks=chunks, layout=layout)
        if kind == "object":
            enc = raw.get("encoding")
            if enc == "json":
                self.expect("value" in raw, f"{ctx}.value", "present")
                return ObjectRecord(encoding="json", value=raw["value"])
            if enc == "pickle":
                return ObjectRecord(encoding="pickle", chunk=self.chunk(self.obj(raw, "chunk", ctx), ctx))
            self.fail(f"{ctx}.encoding", '"json" or "pickle"')
        self.fail(f"{ctx}.kind", '"tensor", "object" or "per_rank"')

    def item(self, raw: dict, name: str) -> Item:
        ctx = f"items[{name!r}]"
        if isinstance(raw, dict) and raw.get("kind") == "per_rank":
            ranks = self._get(raw, "ranks", ctx)
            self.expect(isinstance(ranks, list) and ranks, f"{ctx}.ranks", "a non-empty list")
            return PerRankRecord(
                ranks=tuple(self.record(r, f"{ctx}.ranks[{i}]") for i, r in enumerate(ranks))
            )
        return self.record(raw, ctx)
