"""PyTorch DCP checkpoints: read in place, convert to stashpoint, export from stashpoint.

A DCP checkpoint (``torch.distributed.checkpoint`` with its filesystem writer) is a
directory holding a pickled ``.metadata`` and ``__<rank>_<n>.distcp`` files in which
every tensor chunk is its own ``torch.save`` archive and every other value a
``torch.save``'d object.

Reading one asks for no trust:

* ``.metadata`` is read by an unpickler that only builds DCP's own metadata classes,
  ``torch.Size``, dtypes and plain containers (anything else raises).
* A ``torch.save`` archive is an uncompressed zip, so the raw bytes of a tensor chunk
  sit at a fixed place inside it.  :func:`dcp_index` finds that place from the zip
  headers and describes the checkpoint as a stashpoint :class:`~stashpoint.format.index.Index`
  whose chunks point straight at those bytes; :func:`stashpoint.load` then reads only
  the byte ranges each rank needs, at any world size, as for its own checkpoints.  DCP
  records no checksums, so nothing is verified.
* Non-tensor values are decoded with ``torch.load(weights_only=True)``; a value that
  needs more is marked as pickled and is read only with ``allow_pickle=True``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import time
import zipfile
from collections.abc import Iterable

import torch

from stashpoint.errors import IndexCorruptError, UnsupportedFormatVersionError
from stashpoint.format.dtypes import dtype_name, is_supported
from stashpoint.format.index import ChunkRecord, Index, ObjectRecord, SaveMetadata, TensorRecord
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
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.memory_format):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def is_dcp(storage: Storage, path: str) -> bool:
    return storage.exists(storage.join(path, DCP_METADATA))


def read_dcp_metadata(storage: Storage, path: str):
    """DCP's ``Metadata`` object, read without trusting the pickle."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401  (registers the classes)

    where = storage.describe(path)
    raw = storage.read_bytes(storage.join(path, DCP_METADATA))
    try:
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
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
    except zipfile.BadZipFile as exc:
        raise IndexCorruptError(f"{what}: not a torch.save archive: {exc}") from exc
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
        raise UnsupportedFormatVersionError(
            f"{what}: expected one uncompressed storage of {nbytes} bytes in its archive"
        )
    head = storage.read_range(file_path, start + data[0].header_offset, start + data[0].header_offset + 30)
    sig, name_len, extra_len = head[:4], *struct.unpack("<HH", head[26:30])
    if sig != b"PK\x03\x04":
        raise IndexCorruptError(f"{what}: bad zip local header")
    return start + data[0].header_offset + 30 + name_len + extra_len


def _decode_value(blob: bytes) -> tuple[str, object]:
    """("json", value) when weights-only loading and tagged JSON both hold it, else pickled."""
    from stashpoint.format.values import NotRepresentable, to_json

    try:
        value = torch.load(io.BytesIO(blob), weights_only=True)
        return "json", to_json(value)
    except (pickle.UnpicklingError, RuntimeError, NotRepresentable, AttributeError, TypeError):
        return TORCH_PICKLE, None


def dcp_index(storage: Storage, path: str) -> Index:
    """Describe a DCP checkpoint as a stashpoint index (see the module docstring)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    where = storage.describe(path)
    md = read_dcp_metadata(storage, path)
    infos = {
        (k.fqn, tuple(k.offset) if k.offset is not None else None): v for k, v in md.storage_data.items()
    }
    items: dict = {}
    files: set[str] = set()
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
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
                fpath = storage.join(path, info.relative_path)
                what = f"{where}: {fqn!r} chunk at {list(c.offsets)}"
                lo = (
                    _tensor_bytes_in_archive(storage, fpath, info.offset, info.length, nbytes, what)
                    if nbytes
                    else info.offset
                )
                files.add(info.relative_path)
                chunks.append(
                    ChunkRecord(
                        offsets=tuple(c.offsets),
                        shape=tuple(c.sizes),
                        file=info.relative_path,
                        key=f"{fqn}@{','.join(map(str, c.offsets))}",
                        byte_range=(lo, lo + nbytes),
                        crc32c=(),
                    )
                )
            chunks.sort(key=lambda ch: ch.offsets)
            items[fqn] = TensorRecord(dtype_name(dtype), tuple(meta.size), tuple(chunks))
        elif isinstance(meta, BytesStorageMetadata):
            info = infos.get((fqn, None))
            if info is None:
                raise IndexCorruptError(f"{where}: no storage record for {fqn!r}")
            blob = storage.read_range(
                storage.join(path, info.relative_path), info.offset, info.offset + info.length
            )
            encoding, value = _decode_value(blob)
            if encoding == "json":
                items[fqn] = ObjectRecord("json", value)
            else:
                chunk = ChunkRecord(
                    (0,),
                    (info.length,),
                    info.relative_path,
                    fqn,
                    (info.offset, info.offset + info.length),
                    (),
                )
                items[fqn] = ObjectRecord(TORCH_PICKLE, None, chunk)
    items = _regroup_param_groups(items)
    ranks = {f.split("_")[2] for f in files if f.startswith("__") and f.count("_") >= 3}
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
        out[prefix] = ObjectRecord("json", [by_index[i] for i in sorted(by_index)])
    return out


def _expand_param_groups(name: str, value: object) -> Iterable[tuple[str, object]]:
    if name.split(".")[-1] == "param_groups" and isinstance(value, list):
        if all(isinstance(g, dict) for g in value):
            for i, group in enumerate(value):
                for k, v in group.items():
                    yield f"{name}.{i}.{k}", v
            return
    yield name, value


def export_dcp(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    keys: list[str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress=None,
):
    """Write the checkpoint at ``src`` as a DCP checkpoint at ``dst`` (a local directory).

    Streams one whole tensor at a time into one ``__0_0.distcp`` file; each tensor is one
    chunk, so ``dcp.load`` reads it into any layout.  Keys are stashpoint's flattened
    names, which are the keys DCP flattens nested state dicts to (an optimizer's
    ``param_groups`` is written as DCP writes it, one value per group and option).
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from stashpoint.convert.stream import ConvertSummary, peak_rss_bytes
    from stashpoint.engine.load import iter_full
    from stashpoint.engine.publish import staged_directory
    from stashpoint.engine.tensors import as_bytes

    t0 = time.perf_counter()
    sd_meta, storage_data, planner = {}, {}, {}
    n_tensors = n_values = total = 0
    # written beside dst and swapped in at once: an existing dst is refused without overwrite
    with staged_directory(dst, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, DCP_DATA_FILE), "wb") as f:
            for name, value in iter_full(os.fspath(src), keys, allow_pickle=allow_pickle):
                if isinstance(value, torch.Tensor):
                    t = value.contiguous()
                    zero = torch.Size([0] * t.dim())
                    buf = io.BytesIO()
                    torch.save(t, buf)
                    offset = f.tell()
                    f.write(buf.getbuffer())
                    sd_meta[name] = TensorStorageMetadata(
                        TensorProperties(dtype=t.dtype), t.shape, [ChunkStorageMetadata(zero, t.shape)]
                    )
                    storage_data[MetadataIndex(name, zero)] = _StorageInfo(
                        DCP_DATA_FILE, offset, f.tell() - offset
                    )
                    planner[name] = (name,)
                    n_tensors += 1
                    total += len(as_bytes(t))
                    if progress is not None:
                        progress(name, t.numel() * t.element_size())
                    continue
                for key, v in _expand_param_groups(name, value):
                    buf = io.BytesIO()
                    torch.save(v, buf)
                    offset = f.tell()
                    f.write(buf.getbuffer())
                    sd_meta[key] = BytesStorageMetadata()
                    storage_data[MetadataIndex(key)] = _StorageInfo(DCP_DATA_FILE, offset, f.tell() - offset)
                    planner[key] = (key,)
                    n_values += 1
            f.flush()
            os.fsync(f.fileno())
        md = Metadata(state_dict_metadata=sd_meta, planner_data=planner, storage_data=storage_data)
        md.version = _dcp_version()
        with open(os.path.join(tmp, DCP_METADATA), "wb") as f:
            pickle.dump(md, f)
            f.flush()
            os.fsync(f.fileno())
    return ConvertSummary(
        tensors=n_tensors,
        bytes=total,
        files=1,
        seconds=time.perf_counter() - t0,
        skipped=(),
        values=n_values,
        peak_rss_bytes=peak_rss_bytes(),
    )


def _dcp_version() -> str:
    try:
        from torch.distributed.checkpoint._version import CURRENT_DCP_VERSION  # type: ignore[attr-defined]

        return str(CURRENT_DCP_VERSION)
    except ImportError:
        return "1.0.0"


def import_dcp(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress=None,
):
    """Turn a DCP checkpoint into a stashpoint checkpoint, one tensor at a time.

    Values DCP stored as arbitrary pickles are copied only with ``allow_pickle``.
    """
    from stashpoint.convert.stream import copy_to_stashpoint

    return copy_to_stashpoint(
        src,
        dst,
        source="torch.distributed.checkpoint",
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        progress=progress,
    )
