"""HuggingFace safetensors directories described as a stashpoint index, read in place.

A directory holds ``model.safetensors``, or shards named by the ``weight_map`` of
``model.safetensors.index.json``.  Only the safetensors headers are read; each tensor
becomes one chunk pointing at its bytes, so loads read just the ranges a rank needs.
Every shard name must lie inside the directory, and every length a file claims (its
header length, each tensor's data offsets) is checked against the file's size before
anything is allocated.  HF files carry no checksums, so nothing is verified.
"""

from __future__ import annotations

from stashpoint.errors import DataFileMissingError, IndexCorruptError, TruncatedDataError
from stashpoint.foreign.paths import member
from stashpoint.format.dtypes import dtype_from_safetensors_code, dtype_name, itemsize
from stashpoint.format.index import ChunkRecord, Index, SaveMetadata, TensorRecord
from stashpoint.format.index_json import parse_strict
from stashpoint.storage import Storage

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
HF_CONFIG = "config.json"
#: safetensors refuses headers over 100 MB; so do we, before reading one
MAX_HEADER_BYTES = 100_000_000
#: dimensions and offsets beyond this cannot describe a real file (and overflow torch)
_MAX_INT = 1 << 62
#: an index json or config.json larger than this is not one
_MAX_JSON_BYTES = 64 << 20


def is_hf_dir(storage: Storage, path: str) -> bool:
    """An HF weights directory: ``model.safetensors`` or its sharded index."""
    return storage.exists(storage.join(path, HF_INDEX)) or storage.exists(storage.join(path, HF_SINGLE))


def _read_json(storage: Storage, path: str, name: str, follow_symlinks: bool) -> object:
    where = storage.describe(path)
    fpath = member(storage, path, name, what="HF file", follow_symlinks=follow_symlinks)
    if storage.size(fpath) > _MAX_JSON_BYTES:
        raise IndexCorruptError(f"{where}: {name} is larger than {_MAX_JSON_BYTES} bytes")
    return parse_strict(storage.read_bytes(fpath), f"{where}: {name}")


def hf_config(storage: Storage, path: str, *, follow_symlinks: bool = False) -> dict:
    """The directory's ``config.json`` (empty when there is none)."""
    if not storage.exists(storage.join(path, HF_CONFIG)):
        return {}
    doc = _read_json(storage, path, HF_CONFIG, follow_symlinks)
    return doc if isinstance(doc, dict) else {}


def _weight_map(storage: Storage, path: str, follow_symlinks: bool) -> dict[str, str]:
    doc = _read_json(storage, path, HF_INDEX, follow_symlinks)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        where = storage.describe(path)
        raise IndexCorruptError(f"{where}: bad {HF_INDEX}: 'weight_map' must map names to file names")
    return weight_map


def hf_files(storage: Storage, path: str, *, follow_symlinks: bool = False) -> list[str]:
    """The safetensors files of the directory, each checked to lie inside it."""
    if not storage.exists(storage.join(path, HF_INDEX)):
        return [HF_SINGLE]
    files = sorted(set(_weight_map(storage, path, follow_symlinks).values()))
    for name in files:
        member(storage, path, name, what=f"{HF_INDEX} entry", follow_symlinks=follow_symlinks)
    return files


def _header(storage: Storage, fpath: str, name: str, where: str) -> tuple[int, int, dict]:
    """``(data start, file size, header)`` of one safetensors file, lengths checked."""
    try:
        size = storage.size(fpath)
    except FileNotFoundError:
        raise DataFileMissingError(f"{where}: data file {name!r} is missing") from None
    head = storage.read_range(fpath, 0, 8)
    if len(head) < 8:
        raise TruncatedDataError(f"{where}: {name} is too short for a safetensors file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise TruncatedDataError(
            f"{where}: {name} claims a {n}-byte safetensors header but has {size} bytes in all"
        )
    header = parse_strict(storage.read_range(fpath, 8, 8 + n), f"{where}: safetensors header of {name}")
    if not isinstance(header, dict):
        raise IndexCorruptError(f"{where}: {name} has a safetensors header that is not a JSON object")
    return 8 + n, size, header


def _tensor(key: str, meta: object, name: str, start: int, size: int, where: str) -> TensorRecord:
    what = f"{where}: {name} entry {key!r}"
    try:
        dtype = dtype_from_safetensors_code(meta["dtype"])  # type: ignore[index]
        shape = tuple(meta["shape"])  # type: ignore[index]
        begin, end = meta["data_offsets"]  # type: ignore[index]
    except KeyError as exc:
        raise IndexCorruptError(f"{what}: unsupported or missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{what}: malformed ({exc})") from None
    ints = (*shape, begin, end)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_INT for v in ints):
        raise IndexCorruptError(f"{what}: shape and data_offsets must be non-negative integers below 2**62")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * itemsize(dtype):
        raise IndexCorruptError(f"{what}: data_offsets {[begin, end]} do not match its shape and dtype")
    if start + end > size:
        raise TruncatedDataError(f"{what}: ends at byte {start + end} but the file has {size} bytes")
    chunk = ChunkRecord(
        offsets=(0,) * len(shape),
        shape=shape,
        file=name,
        key=key,
        byte_range=(start + begin, start + end),
        crc32c=(),
    )
    return TensorRecord(dtype=dtype_name(dtype), shape=shape, chunks=(chunk,))


def _check_tiling(records: list[TensorRecord], name: str, start: int, size: int, where: str) -> None:
    """The tensors' bytes tile the data section exactly, as safetensors requires.

    A tensor dropped from the header, or one whose offsets were moved, leaves a gap or an
    overlap: without this check the rest of the file would still read "fine".
    """
    pos = start
    for rec in sorted(records, key=lambda r: r.chunks[0].byte_range):
        lo, hi = rec.chunks[0].byte_range
        if lo != pos:
            raise IndexCorruptError(
                f"{where}: {name}: the tensors' data_offsets leave a gap or overlap at byte "
                f"{pos - start} of the data section"
            )
        pos = hi
    if pos != size:
        raise IndexCorruptError(f"{where}: {name}: {size - pos} bytes after the last tensor belong to none")


def _check_weight_map(weight_map: dict[str, str], found: dict[str, str], where: str) -> None:
    """Every name of the sharded index is in the file it names, and every tensor is listed."""
    for key, file in weight_map.items():
        if found.get(key) != file:
            raise IndexCorruptError(f"{where}: {HF_INDEX} puts {key!r} in {file!r}, which does not hold it")
    extra = sorted(set(found) - set(weight_map))
    if extra:
        name = found[extra[0]]
        raise IndexCorruptError(f"{where}: {name} holds {extra[0]!r}, which {HF_INDEX} does not list")


def hf_index(storage: Storage, path: str, *, follow_symlinks: bool = False) -> Index:
    """Describe an HF safetensors directory as a stashpoint index (names as in the files)."""
    where = storage.describe(path)
    items: dict = {}
    found: dict[str, str] = {}
    for name in hf_files(storage, path, follow_symlinks=follow_symlinks):
        fpath = member(storage, path, name, what="HF data file", follow_symlinks=follow_symlinks)
        start, size, header = _header(storage, fpath, name, where)
        records = {
            k: _tensor(k, meta, name, start, size, where) for k, meta in header.items() if k != "__metadata__"
        }
        _check_tiling(list(records.values()), name, start, size, where)
        for key in records:
            if key in found:
                raise IndexCorruptError(f"{where}: {key!r} is in both {found[key]} and {name}")
            found[key] = name
        items.update(records)
    if storage.exists(storage.join(path, HF_INDEX)):
        _check_weight_map(_weight_map(storage, path, follow_symlinks), found, where)
    meta = SaveMetadata(
        world_size=1,
        created_unix=0.0,
        torch_version="",
        stashpoint_version="",
        user={"source_format": "huggingface"},
    )
    return Index(metadata=meta, items=items, crc_block_bytes=0)
