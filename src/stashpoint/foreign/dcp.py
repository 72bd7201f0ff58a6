"""PyTorch DCP checkpoints described as a stashpoint index, read in place.

A DCP checkpoint (``torch.distributed.checkpoint`` with its filesystem writer) is a
directory holding a pickled ``.metadata`` and ``__<rank>_<n>.distcp`` files in which
every tensor chunk is its own ``torch.save`` archive and every other value a
``torch.save``'d object.

Reading one asks for no trust:

* ``.metadata`` is read by an unpickler that only builds DCP's own metadata classes,
  ``torch.Size``, dtypes and plain containers (anything else raises).
* Every ``relative_path`` must name a file inside the checkpoint, and every offset and
  length must lie inside that file, before anything is read or allocated.
* A ``torch.save`` archive is an uncompressed zip, so the raw bytes of a tensor chunk
  sit at a fixed place inside it.  :func:`dcp_index` finds that place from the zip
  headers and describes the checkpoint as a stashpoint :class:`~stashpoint.format.index.Index`
  whose chunks point straight at those bytes, so loads read only the byte ranges each
  rank needs, at any world size.  DCP records no checksums, so nothing is verified.
* Non-tensor values are decoded with ``torch.load(weights_only=True)``; a value that
  needs more is marked as pickled and is read only with ``allow_pickle=True``.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import torch

from stashpoint.errors import (
    DataFileMissingError,
    IndexCorruptError,
    StashpointError,
    TruncatedDataError,
    UnsupportedFormatVersionError,
)
from stashpoint.foreign.paths import member
from stashpoint.format.dtypes import dtype_name, is_supported
from stashpoint.format.index import ChunkRecord, Index, ObjectRecord, SaveMetadata, TensorRecord
from stashpoint.format.values import NotRepresentable, to_json
from stashpoint.storage import Storage

DCP_METADATA = ".metadata"
DCP_DATA_FILE = "__0_0.distcp"
#: DCP's ``BYTE_IO`` values that need a full unpickler (read only with allow_pickle)
TORCH_PICKLE = "torch_pickle"

_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        kinds = (torch.dtype, torch.layout, torch.memory_format)
        if module == "torch" and isinstance(getattr(torch, name, None), kinds):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def is_dcp(storage: Storage, path: str) -> bool:
    return storage.exists(storage.join(path, DCP_METADATA))


def read_dcp_metadata(storage: Storage, path: str, *, follow_symlinks: bool = False):
    """DCP's ``Metadata`` object, read without trusting the pickle."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401  (registers the classes)

    where = storage.describe(path)
    md_path = member(storage, path, DCP_METADATA, what="DCP metadata", follow_symlinks=follow_symlinks)
    raw = storage.read_bytes(md_path)
    try:
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise IndexCorruptError(f"{where}: cannot read DCP metadata: {exc}") from exc


class _Window(io.RawIOBase):
    """A read-only file over ``length`` bytes at ``start`` of one object (a zip inside a file)."""

    def __init__(self, storage: Storage, path: str, start: int, length: int) -> None:
        self._s, self._path, self._start, self._len, self._pos = storage, path, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._len - self._pos)
        if n <= 0:
            return 0
        got = self._s.read_into(self._path, self._start + self._pos, memoryview(b).cast("B")[:n])
        self._pos += got
        return got


def _tensor_bytes_in_archive(
    storage: Storage, file_path: str, start: int, length: int, nbytes: int, what: str
) -> int:
    """Absolute offset of the raw tensor bytes inside the ``torch.save`` archive at ``start``."""
    win = _Window(storage, file_path, start, length)
    try:
        with zipfile.ZipFile(win) as zf:
            infos = zf.infolist()
            data = [
                i for i in infos if len(i.filename.split("/")) == 3 and i.filename.split("/")[1] == "data"
            ]
            order = [i for i in infos if i.filename.endswith("/byteorder")]
            if order and zf.read(order[0]) != b"little":
                raise UnsupportedFormatVersionError(f"{what}: big-endian tensor data is not supported")
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise IndexCorruptError(f"{what}: not a torch.save archive: {exc}") from exc
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
        raise UnsupportedFormatVersionError(
            f"{what}: expected one uncompressed storage of {nbytes} bytes in its archive"
        )
    local = start + data[0].header_offset
    head = storage.read_range(file_path, local, local + 30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise IndexCorruptError(f"{what}: bad zip local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    lo = local + 30 + name_len + extra_len
    if lo + nbytes > start + length:
        raise IndexCorruptError(f"{what}: tensor bytes run past the end of their archive")
    return lo


def _decode_value(blob: bytes) -> tuple[str, object]:
    """("json", value) when weights-only loading and tagged JSON both hold it, else pickled."""
    try:
        value = torch.load(io.BytesIO(blob), weights_only=True)
        return "json", to_json(value)
    except (pickle.UnpicklingError, RuntimeError, NotRepresentable, AttributeError, TypeError):
        return TORCH_PICKLE, None
    # a damaged archive (ValueError, EOFError, zip errors) is left to the caller to name


class _Files:
    """The data files of one DCP checkpoint: names checked, sizes looked up once."""

    def __init__(self, storage: Storage, path: str, follow_symlinks: bool) -> None:
        self.storage, self.path, self.follow = storage, path, follow_symlinks
        self.where = storage.describe(path)
        self.sizes: dict[str, int] = {}

    def span(self, fqn: str, info) -> tuple[str, str, int, int]:
        """``(name, storage path, offset, length)`` of one storage record, checked."""
        name = str(info.relative_path)
        what = f"DCP data of {fqn!r}"
        fpath = member(self.storage, self.path, name, what=what, follow_symlinks=self.follow)
        if name not in self.sizes:
            try:
                self.sizes[name] = self.storage.size(fpath)
            except FileNotFoundError:
                raise DataFileMissingError(f"{self.where}: data file {name!r} is missing") from None
        offset, length = info.offset, info.length
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise IndexCorruptError(f"{self.where}: {fqn!r} has a bad offset or length in {name!r}")
        if offset + length > self.sizes[name]:
            raise TruncatedDataError(
                f"{self.where}: {fqn!r} claims bytes {offset}..{offset + length} of {name!r}, "
                f"which has {self.sizes[name]} bytes"
            )
        return name, fpath, offset, length


def _tensor_record(files: _Files, fqn: str, meta, infos: dict) -> TensorRecord:
    where = files.where
    dtype = meta.properties.dtype
    if not is_supported(dtype):
        raise UnsupportedFormatVersionError(f"{where}: {fqn!r} has unsupported dtype {dtype}")
    size = torch.tensor([], dtype=dtype).element_size()
    chunks = []
    for c in meta.chunks:
        info = infos.get((fqn, tuple(c.offsets)))
        if info is None:
            raise IndexCorruptError(f"{where}: no storage record for {fqn!r} at {list(c.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedFormatVersionError(
                f"{where}: {fqn!r} is stored transformed {info.transform_descriptors}"
            )
        nbytes = size
        for n in c.sizes:
            nbytes *= n
        name, fpath, offset, length = files.span(fqn, info)
        what = f"{where}: {fqn!r} chunk at {list(c.offsets)}"
        lo = (
            _tensor_bytes_in_archive(files.storage, fpath, offset, length, nbytes, what) if nbytes else offset
        )
        chunks.append(
            ChunkRecord(
                offsets=tuple(c.offsets),
                shape=tuple(c.sizes),
                file=name,
                key=f"{fqn}@{','.join(map(str, c.offsets))}",
                byte_range=(lo, lo + nbytes),
                crc32c=(),
            )
        )
    chunks.sort(key=lambda ch: ch.offsets)
    return TensorRecord(dtype=dtype_name(dtype), shape=tuple(meta.size), chunks=tuple(chunks))


def _value_record(files: _Files, fqn: str, info) -> ObjectRecord:
    name, fpath, offset, length = files.span(fqn, info)
    try:
        encoding, value = _decode_value(files.storage.read_range(fpath, offset, offset + length))
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as exc:
        if isinstance(exc, StashpointError):
            raise
        raise IndexCorruptError(f"{files.where}: the value {fqn!r} in {name!r} is damaged: {exc}") from exc
    if encoding == "json":
        return ObjectRecord(encoding="json", value=value)
    chunk = ChunkRecord(
        offsets=(0,), shape=(length,), file=name, key=fqn, byte_range=(offset, offset + length), crc32c=()
    )
    return ObjectRecord(encoding=TORCH_PICKLE, value=None, chunk=chunk)


def dcp_index(storage: Storage, path: str, *, follow_symlinks: bool = False) -> Index:
    """Describe a DCP checkpoint as a stashpoint index (see the module docstring)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    where = storage.describe(path)
    md = read_dcp_metadata(storage, path, follow_symlinks=follow_symlinks)
    try:
        infos = {
            (k.fqn, tuple(k.offset) if k.offset is not None else None): v for k, v in md.storage_data.items()
        }
        entries = list(md.state_dict_metadata.items())
    except (AttributeError, TypeError) as exc:
        raise IndexCorruptError(f"{where}: DCP metadata of an unexpected form: {exc}") from exc
    files = _Files(storage, path, follow_symlinks)
    items: dict = {}
    for fqn, meta in entries:
        try:
            if isinstance(meta, TensorStorageMetadata):
                items[fqn] = _tensor_record(files, fqn, meta, infos)
            elif isinstance(meta, BytesStorageMetadata):
                info = infos.get((fqn, None))
                if info is None:
                    raise IndexCorruptError(f"{where}: no storage record for {fqn!r}")
                items[fqn] = _value_record(files, fqn, info)
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            # the metadata unpickled, but into objects missing fields or holding wrong types
            raise IndexCorruptError(f"{where}: DCP metadata of {fqn!r} is damaged: {exc}") from exc
    items = _regroup_param_groups(items)
    ranks = {f.split("_")[2] for f in files.sizes if f.startswith("__") and f.count("_") >= 3}
    meta = SaveMetadata(
        world_size=max(1, len(ranks)),
        created_unix=0.0,
        torch_version="",
        stashpoint_version="",
        user={"source_format": "torch.distributed.checkpoint", "dcp_version": md.version or ""},
    )
    return Index(metadata=meta, items=items, crc_block_bytes=0)


def _regroup_param_groups(items: dict) -> dict:
    """``<p>.param_groups.<i>.<key>`` values -> one ``<p>.param_groups`` list, as stashpoint keeps it."""
    groups: dict[str, dict[int, dict]] = {}
    out = {}
    for fqn, rec in items.items():
        parts = fqn.split(".")
        if (
            len(parts) >= 3
            and "param_groups" in parts
            and isinstance(rec, ObjectRecord)
            and rec.encoding == "json"
        ):
            at = len(parts) - 1 - parts[::-1].index("param_groups")
            if at + 3 == len(parts) and parts[at + 1].isdigit():
                prefix = ".".join(parts[: at + 1])
                groups.setdefault(prefix, {}).setdefault(int(parts[at + 1]), {})[parts[at + 2]] = rec.value
                continue
        out[fqn] = rec
    for prefix, by_index in groups.items():
        out[prefix] = ObjectRecord(encoding="json", value=[by_index[i] for i in sorted(by_index)])
    return out
