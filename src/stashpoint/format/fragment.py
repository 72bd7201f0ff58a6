"""Index fragments: the byte ranges and checksums of a data file's grid chunks.

From format version 3, a tensor described by a grid (:mod:`stashpoint.format.grid`)
keeps its chunks' keys, byte ranges and CRC-32C lists out of ``index.json``: each data
file has a fragment, ``index-RRRRR.json``, written by the rank that wrote the file, and
``index.json`` lists every fragment with its SHA-256 (docs/FORMAT.md §3.4).  A loading
rank reads only the fragments of the files it reads from.  A fragment is believed only
once its bytes match the digest that the (checksummed) ``index.json`` records, and every
entry is checked against the grid it belongs to, so a fragment is as strictly validated
as the index itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from stashpoint.errors import IndexCorruptError
from stashpoint.format.grid import GridCell
from stashpoint.format.index_json import parse_strict
from stashpoint.format.index_parse import BYTES_LIMIT, CRC_LIMIT, INDEX_ITEMSIZE, IndexParser, numel, utf8
from stashpoint.format.records import ChunkRecord, FragmentRef, Item, TensorRecord

FRAGMENT_FORMAT = "stashpoint-fragment"

#: (item name, chunk offsets) -> the chunk's full record
FragmentChunks = dict[tuple[str, tuple[int, ...]], ChunkRecord]


def fragment_name(rank: int) -> str:
    return f"index-{rank:05d}.json"


def fragment_bytes(file: str, save_id: str, version: int, chunks: Sequence[tuple[str, ChunkRecord]]) -> bytes:
    """The bytes of the fragment of data file ``file`` holding ``chunks`` ((item name, record) pairs)."""
    by_item: dict[str, list[dict]] = {}
    for name, c in sorted(chunks, key=lambda x: (x[0], x[1].offsets)):
        by_item.setdefault(name, []).append(
            {
                "offsets": list(c.offsets),
                "key": c.key,
                "byte_range": list(c.byte_range),
                "crc32c": list(c.crc32c),
            }
        )
    doc = {
        "format": FRAGMENT_FORMAT,
        "format_version": version,
        "file": file,
        "save_id": save_id,
        "chunks": by_item,
    }
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def fragment_ref(rank: int, file: str, raw: bytes) -> FragmentRef:
    return FragmentRef(
        rank=rank,
        file=file,
        fragment=fragment_name(rank),
        sha256=hashlib.sha256(raw).hexdigest(),
        size=len(raw),
    )


def parse_fragment(
    raw: bytes, ref: FragmentRef, items: Mapping[str, Item], meta: tuple[str, int], where: str, whole: bool
) -> Fragment:
    """One fragment, checked against its digest, the index's ``meta`` (save id, checksum
    block) and the grids of ``items``; with ``whole``, every entry is checked here, else
    each entry when it is first used (:meth:`Fragment.get`).

    Raises IndexCorruptError naming the fragment and the field for anything that does
    not match: the digest, the JSON, an item that is not a grid tensor, an entry whose
    offsets start no cell of this file, a byte range of the wrong length, the checksums.
    """
    ctx = f"fragments[{ref.rank}]"
    if len(raw) != ref.size or hashlib.sha256(raw).hexdigest() != ref.sha256:
        raise IndexCorruptError(
            f"{where}: index fragment {ref.fragment!r} does not match '{ctx}.sha256' of the index "
            "(it was modified, damaged or replaced after the save)"
        )
    save_id, block = meta
    p = IndexParser(f"{where}/{ref.fragment}")
    p.block = block
    doc = parse_strict(raw, p.where)
    p.expect(isinstance(doc, dict) and doc.get("format") == FRAGMENT_FORMAT, "format", f'"{FRAGMENT_FORMAT}"')
    p.expect(doc.get("file") == ref.file, "file", f"{ref.file!r}, as '{ctx}.file' of the index says")
    p.expect(doc.get("save_id") == save_id, "save_id", "the save_id of the index")
    fragment = Fragment(p, ref, items)
    for name, entries in p.obj(doc, "chunks").items():
        rec = items.get(name)
        ok = isinstance(rec, TensorRecord) and rec.grid is not None
        p.expect(ok, f"chunks[{name!r}]", "a tensor item of the index described by a grid")
        p.expect(isinstance(entries, list), f"chunks[{name!r}]", "a list")
        for i, raw_entry in enumerate(entries):
            fragment.add(name, i, raw_entry, rec)  # type: ignore[arg-type]
    if whole:
        fragment.check_all()
    return fragment


class Fragment:
    """The entries of one fragment by (item name, offsets).  Its bytes matched the digest
    the checksummed index records, so an entry no read uses cannot mislead one: each is
    checked against its grid cell when first used, or all at once (:meth:`check_all`)."""

    def __init__(self, p: IndexParser, ref: FragmentRef, items: Mapping[str, Item]) -> None:
        self.p, self.ref, self.items = p, ref, items
        self.raw: dict[tuple[str, tuple[int, ...]], tuple[int, dict]] = {}
        #: the entries checked so far
        self.checked: FragmentChunks = {}

    def __len__(self) -> int:
        return len(self.raw)

    def add(self, name: str, i: int, raw: object, rec: TensorRecord) -> None:
        offsets = raw.get("offsets") if type(raw) is dict else None
        if type(offsets) is not list or not all(type(x) is int for x in offsets):
            _entry(self.p, raw, _named(name, i), rec, self.ref)  # raises, naming it
        key = (name, tuple(offsets))  # type: ignore[arg-type]
        if key in self.raw:
            self.p.fail(f"chunks[{name!r}][{i}].offsets", "unique in the fragment")
        self.raw[key] = (i, raw)  # type: ignore[assignment]

    def get(self, name: str, cell: GridCell) -> ChunkRecord | None:
        """The checked record of ``cell`` of grid tensor ``name`` (a cell of this file), if listed."""
        key = (name, cell.offsets)
        got = self.checked.get(key)
        if got is None and key in self.raw:
            i, raw = self.raw[key]
            rec = self.items[name]
            got = self.checked[key] = _fields(self.p, raw, _named(name, i), rec, self.ref, cell)  # type: ignore[arg-type]
        return got

    def check_all(self) -> None:
        """Every entry: its offsets start a cell of this file, its fields follow the format."""
        for (name, _), (i, raw) in self.raw.items():
            c = _entry(self.p, raw, _named(name, i), self.items[name], self.ref)  # type: ignore[arg-type]
            self.checked[name, c.offsets] = c


def _named(name: str, i: int) -> Callable[[], str]:
    """The field name of entry ``i`` of item ``name``, made only when an error needs it."""
    return lambda: f"chunks[{name!r}][{i}]"


def _ints(v: object, hi: int, length: int | None = None) -> bool:
    return (
        isinstance(v, list)
        and (length is None or len(v) == length)
        and all(type(x) is int and 0 <= x < hi for x in v)
    )


def _entry(
    p: IndexParser, raw: object, ctx: Callable[[], str], rec: TensorRecord, ref: FragmentRef
) -> ChunkRecord:
    """One entry, checked with plain comparisons (a fragment has thousands); ``ctx()`` names it."""
    if not isinstance(raw, dict):
        p.fail(ctx(), "a JSON object")
    offsets = raw.get("offsets")
    if not _ints(offsets, BYTES_LIMIT, len(rec.shape)):
        p.fail(f"{ctx()}.offsets", f"a list of {len(rec.shape)} integers in [0, 2^63)")
    cell = rec.grid.cell_at(offsets)
    if cell is None or cell.rank != ref.rank:
        p.fail(f"{ctx()}.offsets", f"the start of a grid cell of {ref.file!r}")
    return _fields(p, raw, ctx, rec, ref, cell)


def _fields(
    p: IndexParser, raw: dict, ctx: Callable[[], str], rec: TensorRecord, ref: FragmentRef, cell: GridCell
) -> ChunkRecord:
    """The record of the entry of ``cell`` (whose offsets it has): key, byte range, checksums."""
    key, byte_range, crc = (raw.get(k) for k in ("key", "byte_range", "crc32c"))
    if not isinstance(key, str) or key == "" or not utf8(key):
        p.fail(f"{ctx()}.key", "a non-empty string")
    if not _ints(byte_range, BYTES_LIMIT, 2) or byte_range[0] > byte_range[1]:
        p.fail(f"{ctx()}.byte_range", "an ordered pair of integers in [0, 2^63)")
    nbytes = numel(cell.shape) * INDEX_ITEMSIZE[rec.dtype]
    if byte_range[1] - byte_range[0] != nbytes:
        p.fail(f"{ctx()}.byte_range", "shape x itemsize long")
    if not _ints(crc, CRC_LIMIT) or len(crc) != max(1, -(-nbytes // p.block)):
        p.fail(f"{ctx()}.crc32c", "one checksum per block, each in [0, 2^32)")
    return ChunkRecord(
        offsets=cell.offsets,
        shape=cell.shape,
        file=ref.file,
        key=key,
        byte_range=tuple(byte_range),
        crc32c=tuple(crc),
    )


class GridChunks:
    """The chunks of grid tensors, read from the fragments they live in, each fragment once.

    ``load(ref)`` returns a fragment's bytes (the engine reads them from storage);
    ``items`` are the index's items, against whose grids every fragment is checked:
    each entry when it is first used, or (``whole``) every entry of a fragment read.
    """

    def __init__(
        self,
        items: Mapping[str, Item],
        fragments: Sequence[FragmentRef | None],
        meta: tuple[str, int],
        load: Callable[[FragmentRef], bytes],
        where: str,
        whole: bool = False,
    ) -> None:
        self.items, self.refs, self.load, self.where = items, fragments, load, where
        self.meta, self.whole = meta, whole
        self.parsed: dict[int, Fragment] = {}

    def fragment(self, rank: int) -> Fragment:
        got = self.parsed.get(rank)
        if got is None:
            ref = self.refs[rank]
            raw = self.load(ref)  # type: ignore[arg-type]
            got = self.parsed[rank] = parse_fragment(raw, ref, self.items, self.meta, self.where, self.whole)  # type: ignore[arg-type]
        return got

    def checked(self) -> Iterator[ChunkRecord]:
        """The records of the fragments' entries checked so far (those read or to be read)."""
        for part in self.parsed.values():
            yield from part.checked.values()

    def ref_of(self, fqn: str, cell: GridCell) -> FragmentRef:
        ref = self.refs[cell.rank] if cell.rank < len(self.refs) else None
        if ref is None:
            raise IndexCorruptError(
                f"{self.where}: index field 'items[{fqn!r}].grid' places chunk {list(cell.offsets)} in the "
                f"file of rank {cell.rank}, which has no entry in 'fragments'"
            )
        return ref

    def chunks(self, fqn: str, rec: TensorRecord, cells: Iterable[GridCell]) -> tuple[ChunkRecord, ...]:
        """The full records of ``cells`` of grid tensor ``fqn``."""
        out = []
        for cell in cells:
            ref = self.ref_of(fqn, cell)
            got = self.fragment(ref.rank).get(fqn, cell)
            if got is None:
                raise IndexCorruptError(
                    f"{self.where}: index fragment {ref.fragment!r} lacks chunk {list(cell.offsets)} of "
                    f"{fqn!r}, which 'items[{fqn!r}].grid' places in {ref.file!r}"
                )
            out.append(got)
        return tuple(out)

    def overlapping(
        self, fqn: str, rec: TensorRecord, boxes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]
    ) -> tuple[ChunkRecord, ...]:
        """The chunks of ``fqn`` that overlap any of ``boxes`` ((offsets, shape) pairs), each once.

        Each cell is looked up as the grid yields it, so a grid that claims more cells than
        the fragments list fails at the first missing one, never after listing them all."""
        found: dict[int, ChunkRecord] = {}
        for offsets, shape in boxes:
            for cell in rec.grid.cells(offsets, shape):
                if cell.number not in found:
                    (found[cell.number],) = self.chunks(fqn, rec, (cell,))
        return tuple(found[n] for n in sorted(found))

    def expanded(self, fqn: str, rec: TensorRecord) -> TensorRecord:
        """``rec`` with every chunk listed (reads every fragment that holds one)."""
        chunks = self.chunks(fqn, rec, rec.grid.cells())
        return TensorRecord(dtype=rec.dtype, shape=rec.shape, chunks=chunks, layout=rec.layout)

    def check_complete(self) -> None:
        """Every fragment holds no entry beyond the grid cells placed in its file."""
        placed: dict[int, int] = {}
        for rec in self.items.values():
            if isinstance(rec, TensorRecord) and rec.grid is not None:
                for cell in rec.grid.cells():
                    placed[cell.rank] = placed.get(cell.rank, 0) + 1
        for rank, ref in enumerate(self.refs):
            if ref is not None and len(self.fragment(rank)) != placed.get(rank, 0):
                raise IndexCorruptError(
                    f"{self.where}: index fragment {ref.fragment!r} holds {len(self.fragment(rank))} chunks "
                    f"but the grids of the index place {placed.get(rank, 0)} in {ref.file!r}"
                )
