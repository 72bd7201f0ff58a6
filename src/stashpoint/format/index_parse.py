"""Validating a parsed index document, field by field (docs/FORMAT.md §6, step 1).

Every malformation becomes an :class:`~stashpoint.errors.IndexCorruptError` that
names the checkpoint and the field, so no reader ever meets a raw ``TypeError``
from an index, and nothing that breaks the format's rules is loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stashpoint.errors import IndexCorruptError, UnsafePathError
from stashpoint.format.grid_parse import parse_fragment_refs, parse_grid
from stashpoint.format.records import INDEX_ITEMSIZE as INDEX_ITEMSIZE
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
    numel,
)
from stashpoint.format.values import MalformedValue, check_plain, from_json
from stashpoint.vocab import LayoutKind, words

#: exclusive upper bounds of the index's ints
BYTES_LIMIT = 1 << 63
CRC_LIMIT = 1 << 32
RANKS_LIMIT = 1 << 31
NAME_BYTES_LIMIT = 255
_PAIRWISE_TILING = 256  # beyond this many chunks, volume and distinct offsets are checked


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SEPARATORS = re.compile("[/\\\\\0]")


def is_plain_file_name(name: str) -> bool:
    """A file of the checkpoint directory itself: no separators, no NUL, not ``.``/``..``."""
    if name in ("", ".", "..") or _SEPARATORS.search(name):
        return False
    try:
        return len(name.encode("utf-8")) <= NAME_BYTES_LIMIT
    except UnicodeEncodeError:  # a lone surrogate
        return False


class IndexParser:
    """Turns a strictly parsed JSON document into index records, or raises IndexCorruptError."""

    def __init__(self, where: str, version: int = 2) -> None:
        self.where = where
        self.version = version
        self.block = 0  # crc_block_bytes, once read
        self.world = 1  # metadata.world_size, once read
        #: layouts and grids already checked, by their JSON text (and the tensor's shape):
        #: the thousands of tensors of a large index share a handful of each
        self.seen: dict[tuple[str, str, tuple[int, ...]], object] = {}

    def once(self, what: str, raw: object, shape: tuple[int, ...], parse):
        """``parse()``, or the result it gave for the same ``what`` of JSON ``raw`` and ``shape``."""
        key = (what, repr(raw), shape)
        got = self.seen.get(key)
        if got is None:
            got = self.seen[key] = parse()
        return got

    def fail(self, field_name: str, wanted: str):
        raise IndexCorruptError(f"{self.where}: index field {field_name!r} must be {wanted}")

    def expect(self, ok: bool, field_name: str, wanted: str) -> None:
        if not ok:
            self.fail(field_name, wanted)

    def get(self, d: dict, key: str, ctx: str):
        name = f"{ctx}.{key}" if ctx else key
        if key not in d:
            self.fail(name, "present")
        return d[key], name

    def obj(self, d: dict, key: str, ctx: str = "") -> dict:
        v, name = self.get(d, key, ctx)
        self.expect(isinstance(v, dict), name, "a JSON object")
        return v

    def list(self, d: dict, key: str, ctx: str) -> list:
        v, name = self.get(d, key, ctx)
        self.expect(isinstance(v, list), name, "a list")
        return v

    def int(self, d: dict, key: str, ctx: str = "", lo: int = 0, hi: int = BYTES_LIMIT) -> int:
        v, name = self.get(d, key, ctx)
        ok = type(v) is int and lo <= v < hi
        self.expect(ok, name, f"an integer in [{lo}, {hi})")
        return v

    def str(self, d: dict, key: str, ctx: str = "") -> str:
        v, name = self.get(d, key, ctx)
        self.expect(isinstance(v, str) and utf8(v), name, "a string")
        return v

    def ints(
        self, d: dict, key: str, ctx: str, length: int | None = None, hi: int = BYTES_LIMIT
    ) -> tuple[int, ...]:
        v = self.list(d, key, ctx)
        ok = all(type(x) is int and 0 <= x < hi for x in v) and (length is None or len(v) == length)
        count = f"{length} " if length is not None else ""
        self.expect(ok, f"{ctx}.{key}", f"a list of {count}integers in [0, {hi})")
        return tuple(v)

    def metadata(self, doc: dict) -> SaveMetadata:
        meta = self.obj(doc, "metadata")
        step = meta.get("step")
        self.expect(
            step is None or (type(step) is int and abs(step) < BYTES_LIMIT),
            "metadata.step",
            "an integer or null",
        )
        created, _ = self.get(meta, "created_unix", "metadata")
        finite_float = type(created) is float and math.isfinite(created)
        ok = finite_float or (type(created) is int and abs(created) < BYTES_LIMIT)
        self.expect(ok, "metadata.created_unix", "a finite number")
        user = self.obj(meta, "user", "metadata")
        try:
            check_plain(user)
        except MalformedValue as exc:
            self.fail(f"metadata.user{exc.where}", f"plain JSON, not {exc.problem}")
        save_id = meta.get("save_id", "")
        self.expect(isinstance(save_id, str), "metadata.save_id", "a string")
        return SaveMetadata(
            world_size=self.int(meta, "world_size", "metadata", lo=1, hi=RANKS_LIMIT),
            created_unix=float(created),
            torch_version=self.str(meta, "torch_version", "metadata"),
            stashpoint_version=self.str(meta, "stashpoint_version", "metadata"),
            step=step,
            user=user,
            save_id=save_id,
            layouts=self.names(meta),
        )

    def names(self, meta: dict) -> tuple[NameLayout, ...]:
        """``metadata.names`` (optional); a later version of it than 1 is left unread."""
        if "names" not in meta:
            return ()
        names = self.obj(meta, "names", "metadata")
        version = names.get("version")
        self.expect(type(version) is int and version >= 1, "metadata.names.version", "an integer >= 1")
        if version != 1:
            return ()  # informational only: a newer writer's record does not stop a load
        out = []
        for i, raw in enumerate(self.list(names, "layouts", "metadata.names")):
            ctx = f"metadata.names.layouts[{i}]"
            self.expect(isinstance(raw, dict), ctx, "a JSON object")
            kind = self.str(raw, "kind", ctx)
            self.expect(kind in words(LayoutKind), f"{ctx}.kind", " or ".join(map(repr, words(LayoutKind))))
            out.append(
                NameLayout(
                    rank=self.int(raw, "rank", ctx, hi=RANKS_LIMIT),
                    prefix=self.str(raw, "prefix", ctx),
                    kind=kind,
                    key=self.str(raw, "key", ctx),
                    global_ids=self.ints(raw, "global_ids", ctx, hi=RANKS_LIMIT),
                )
            )
        return tuple(out)

    def file_name(self, d: dict, key: str, ctx: str) -> str:
        name = self.str(d, key, ctx)
        if not is_plain_file_name(name):
            raise UnsafePathError(
                f"{self.where}: index field '{ctx}.{key}' must be a plain file name inside the "
                f"checkpoint, not {name[:80]!r}"
            )
        return name

    def chunk(self, raw: object, ctx: str) -> ChunkRecord:
        self.expect(isinstance(raw, dict), ctx, "a JSON object")
        name = self.file_name(raw, "file", ctx)
        key = self.str(raw, "key", ctx)
        self.expect(key != "", f"{ctx}.key", "a non-empty string")
        byte_range = self.ints(raw, "byte_range", ctx, 2)
        self.expect(byte_range[0] <= byte_range[1], f"{ctx}.byte_range", "ordered")
        return ChunkRecord(
            offsets=self.ints(raw, "offsets", ctx),
            shape=self.ints(raw, "shape", ctx),
            file=name,
            key=key,
            byte_range=byte_range,
            crc32c=self.ints(raw, "crc32c", ctx, hi=CRC_LIMIT),
        )

    def layout(self, raw: dict, ctx: str) -> Layout:
        ctx = f"{ctx}.layout"
        mesh_shape = self.ints(raw, "mesh_shape", ctx, hi=RANKS_LIMIT)
        names = raw.get("mesh_dim_names")
        ok = names is None or (
            isinstance(names, list)
            and len(names) == len(mesh_shape)
            and all(isinstance(n, str) for n in names)
        )
        self.expect(ok, f"{ctx}.mesh_dim_names", "null or one string per mesh dimension")
        placements = self.list(raw, "placements", ctx)
        ok = len(placements) == len(mesh_shape) and all(isinstance(p, str) for p in placements)
        self.expect(ok, f"{ctx}.placements", "one string per mesh dimension")
        return Layout(
            mesh_shape=mesh_shape,
            mesh_dim_names=None if names is None else tuple(names),
            placements=tuple(placements),
        )

    def tensor(self, raw: dict, ctx: str) -> TensorRecord:
        dtype = self.str(raw, "dtype", ctx)
        self.expect(dtype in INDEX_ITEMSIZE, f"{ctx}.dtype", "a dtype name from FORMAT.md §2")
        shape = self.ints(raw, "shape", ctx)
        layout = None
        if raw.get("layout") is not None:
            obj = self.obj(raw, "layout", ctx)
            layout = self.once("layout", obj, (), lambda: self.layout(obj, ctx))
        if self.version >= 3 and "grid" in raw:
            self.expect("chunks" not in raw, f"{ctx}.chunks", "absent when the item has a grid")
            obj = self.obj(raw, "grid", ctx)
            grid = self.once("grid", obj, shape, lambda: parse_grid(self, obj, f"{ctx}.grid", shape))
            return TensorRecord(dtype=dtype, shape=shape, chunks=(), layout=layout, grid=grid)
        chunks = tuple(
            self.chunk(c, f"{ctx}.chunks[{i}]") for i, c in enumerate(self.list(raw, "chunks", ctx))
        )
        for i, c in enumerate(chunks):
            ok = len(c.offsets) == len(shape) == len(c.shape) and all(
                o + s <= g for o, s, g in zip(c.offsets, c.shape, shape)
            )
            self.expect(ok, f"{ctx}.chunks[{i}]", "inside the tensor's shape")
        self.check_tiling(shape, chunks, ctx)
        rec = TensorRecord(dtype=dtype, shape=shape, chunks=chunks, layout=layout)
        self.check_sizes(rec, INDEX_ITEMSIZE[dtype], ctx)
        return rec

    def value(self, raw: dict, ctx: str) -> ObjectRecord:
        value, _ = self.get(raw, "value", ctx)
        try:
            from_json(value)
        except MalformedValue as exc:
            raise IndexCorruptError(
                f"{self.where}: index field '{ctx}.value{exc.where}' is malformed tagged JSON: {exc.problem}"
            ) from None
        return ObjectRecord(encoding="json", value=value)

    def record(self, raw: object, ctx: str) -> Record:
        self.expect(isinstance(raw, dict), ctx, "a JSON object")
        kind = raw.get("kind")
        if kind == "tensor":
            return self.tensor(raw, ctx)
        if kind != "object":
            self.fail(f"{ctx}.kind", '"tensor", "object" or "per_rank"')
        encoding = raw.get("encoding")
        if encoding == "json":
            return self.value(raw, ctx)
        self.expect(encoding == "pickle", f"{ctx}.encoding", '"json" or "pickle"')
        chunk = self.chunk(self.obj(raw, "chunk", ctx), f"{ctx}.chunk")
        ok = chunk.offsets == (0,) and len(chunk.shape) == 1
        self.expect(ok, f"{ctx}.chunk", "a chunk with offsets [0] and shape [nbytes]")
        rec = ObjectRecord(encoding="pickle", chunk=chunk)
        self.check_sizes(rec, 1, ctx)
        return rec

    def item(self, raw: object, name: str, world_size: int) -> Item:
        ctx = f"items[{name!r}]"
        self.expect(name != "" and utf8(name), ctx, "named by a non-empty string")
        if not (isinstance(raw, dict) and raw.get("kind") == "per_rank"):
            return self.record(raw, ctx)
        ranks = self.list(raw, "ranks", ctx)
        self.expect(
            len(ranks) == world_size, f"{ctx}.ranks", f"a list of metadata.world_size = {world_size} records"
        )
        records = tuple(self.record(r, f"{ctx}.ranks[{i}]") for i, r in enumerate(ranks))
        for i, rec in enumerate(records):
            if isinstance(rec, TensorRecord):
                ok = (
                    rec.layout is None
                    and all(sum(c.offsets) == 0 for c in rec.chunks)
                    and len(rec.chunks) <= 1
                )
                self.expect(ok, f"{ctx}.ranks[{i}]", "one whole chunk and no layout")
        return PerRankRecord(ranks=records)

    def check_sizes(self, rec: Record, size: int, ctx: str) -> None:
        """Byte ranges match shapes and dtypes; one checksum per block."""
        for i, c in enumerate(chunks_of(rec)):
            field_name = f"{ctx}.chunk" if isinstance(rec, ObjectRecord) else f"{ctx}.chunks[{i}]"
            self.expect(
                c.nbytes == numel(c.shape) * size, f"{field_name}.byte_range", "shape x itemsize long"
            )
            self.expect(
                len(c.crc32c) == max(1, -(-c.nbytes // self.block)),
                f"{field_name}.crc32c",
                "one checksum per block",
            )

    def check_tiling(self, shape: tuple[int, ...], chunks: tuple[ChunkRecord, ...], ctx: str) -> None:
        """The chunks cover every element of the tensor exactly once."""
        total = numel(shape)
        covered = sum(numel(c.shape) for c in chunks)
        self.expect(covered == total, f"{ctx}.chunks", f"covering all {total} elements exactly once")
        if len(chunks) > _PAIRWISE_TILING:
            self.expect(len({c.offsets for c in chunks}) == len(chunks), f"{ctx}.chunks", "non-overlapping")
            return
        for i, a in enumerate(chunks):
            for b in chunks[i + 1 :]:
                overlap = all(
                    max(x, y) < min(x + s, y + t)
                    for x, s, y, t in zip(a.offsets, a.shape, b.offsets, b.shape)
                )
                self.expect(not overlap, f"{ctx}.chunks", "non-overlapping")

    def document(self, doc: dict) -> ParsedIndex:
        """The metadata, items, checksum block size and (version 3) fragments of an index."""
        self.block = self.int(doc, "crc_block_bytes", lo=64)
        self.expect(self.block % 64 == 0, "crc_block_bytes", "a positive multiple of 64")
        metadata = self.metadata(doc)
        self.world = metadata.world_size
        raw_items = self.obj(doc, "items")
        items = {n: self.item(raw, n, metadata.world_size) for n, raw in raw_items.items()}
        fragments = parse_fragment_refs(self, doc) if self.version >= 3 else ()
        return ParsedIndex(metadata=metadata, items=items, block=self.block, fragments=fragments)


@dataclass(frozen=True)
class ParsedIndex:
    metadata: SaveMetadata
    items: dict[str, Item]
    block: int
    fragments: tuple[FragmentRef | None, ...]
