"""PyTorch DCP checkpoints: convert to stashpoint, export from stashpoint.

Reading a DCP checkpoint in place (without trusting its pickled metadata) lives in
:mod:`stashpoint.foreign.dcp`; this module holds the import and export pipelines.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from stashpoint.convert.dcp_paths import nested_paths, optimizer_params
from stashpoint.convert.stream import ConvertSummary, copy_to_stashpoint, peak_rss_bytes
from stashpoint.engine.load import iter_full
from stashpoint.engine.publish import staged_directory
from stashpoint.engine.reader import read_index
from stashpoint.foreign.dcp import DCP_DATA_FILE, DCP_METADATA
from stashpoint.format.index import PerRankRecord
from stashpoint.storage import resolve


def _expand_param_groups(name: str, value: object) -> Iterable[tuple[str, object]]:
    if name.split(".")[-1] == "param_groups" and isinstance(value, list):
        if all(isinstance(g, dict) for g in value):
            for i, group in enumerate(value):
                for k, v in group.items():
                    yield f"{name}.{i}.{k}", v
            return
    yield name, value


class _DcpFile:
    """One DCP data file being appended to, and the metadata that describes it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sd_meta: dict = {}
        self.storage_data: dict = {}
        self.planner: dict[str, tuple] = {}
        self.optimizers: dict = {}
        self.tensors = self.values = self.bytes = 0

    def _append(self, obj: object) -> _StorageInfo:
        buf = io.BytesIO()
        torch.save(obj, buf)
        offset = self.f.tell()
        self.f.write(buf.getbuffer())
        return _StorageInfo(DCP_DATA_FILE, offset, self.f.tell() - offset)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> int:
        """Append one whole tensor as one chunk; returns its bytes."""
        t = tensor.contiguous()
        zero = torch.Size([0] * t.dim())
        self.storage_data[MetadataIndex(name, zero)] = self._append(t)
        self.sd_meta[name] = TensorStorageMetadata(
            TensorProperties(dtype=t.dtype), t.shape, [ChunkStorageMetadata(zero, t.shape)]
        )
        self.planner[name] = (name,)
        nbytes = t.numel() * t.element_size()
        self.tensors += 1
        self.bytes += nbytes
        return nbytes

    def add_value(self, name: str, value: object) -> None:
        self.optimizers.update(optimizer_params(name, value))
        for key, v in _expand_param_groups(name, value):
            self.storage_data[MetadataIndex(key)] = self._append(v)
            self.sd_meta[key] = BytesStorageMetadata()
            self.planner[key] = (key,)
            self.values += 1

    def metadata(self) -> Metadata:
        # DCP nests the flattened keys by these paths (dcp_to_torch_save rebuilds them)
        planner = nested_paths(self.planner, self.optimizers)
        md = Metadata(state_dict_metadata=self.sd_meta, planner_data=planner, storage_data=self.storage_data)
        md.version = _dcp_version()
        return md


def export_dcp(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    keys: list[str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> ConvertSummary:
    """Write the checkpoint at ``src`` as a DCP checkpoint at ``dst`` (a local directory).

    Streams one whole tensor at a time into one ``__0_0.distcp`` file; each tensor is one
    chunk, so ``dcp.load`` reads it into any layout.  Keys are stashpoint's flattened
    names, which are the keys DCP flattens nested state dicts to (an optimizer's
    ``param_groups`` is written as DCP writes it, one value per group and option), and
    the metadata records how they nest.  Per-rank items have no DCP form: they are left
    out and named in the summary's ``skipped``.  The directory is written beside ``dst``
    and swapped in at once; an existing ``dst`` is refused without ``overwrite``.
    """
    t0 = time.perf_counter()
    items = read_index(*resolve(os.fspath(src))).items
    wanted = set(items if keys is None else keys)
    per_rank = tuple(sorted(n for n, i in items.items() if isinstance(i, PerRankRecord) and n in wanted))
    with staged_directory(dst, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, DCP_DATA_FILE), "wb") as f:
            out = _DcpFile(f)
            for name, value in iter_full(os.fspath(src), keys, allow_pickle=allow_pickle):
                if not isinstance(value, torch.Tensor):
                    out.add_value(name, value)
                    continue
                nbytes = out.add_tensor(name, value)
                if progress is not None:
                    progress(name, nbytes)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, DCP_METADATA), "wb") as f:
            pickle.dump(out.metadata(), f)
            f.flush()
            os.fsync(f.fileno())
    return ConvertSummary(
        tensors=out.tensors,
        bytes=out.bytes,
        files=1,
        seconds=time.perf_counter() - t0,
        skipped=per_rank,
        values=out.values,
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
    return copy_to_stashpoint(
        src,
        dst,
        source="torch.distributed.checkpoint",
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        progress=progress,
    )
