"""PyTorch DCP checkpoints: convert to stashpoint, export from stashpoint.

Reading a DCP checkpoint in place (without trusting its pickled metadata) lives in
:mod:`stashpoint.foreign.dcp`; this module holds the import and export pipelines.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from collections.abc import Iterable

import torch

from stashpoint.convert.dcp_paths import nested_paths, optimizer_params
from stashpoint.foreign.dcp import DCP_DATA_FILE, DCP_METADATA


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
    Per-rank items have no DCP form: they are left out and named in the summary's ``skipped``.
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
    from stashpoint.engine.reader import read_index
    from stashpoint.engine.tensors import as_bytes
    from stashpoint.errors import CheckpointExistsError
    from stashpoint.format.index import PerRankRecord
    from stashpoint.storage import resolve

    t0 = time.perf_counter()
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True")
    # DCP has no per-rank values: iter_full skips them, and the summary says so
    src_items = read_index(*resolve(os.fspath(src))).items
    wanted = set(src_items if keys is None else keys)
    per_rank = tuple(sorted(n for n, i in src_items.items() if isinstance(i, PerRankRecord) and n in wanted))
    tmp = f"{dst}.partial-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    sd_meta, storage_data, planner, optimizers = {}, {}, {}, {}
    n_tensors = n_values = total = 0
    try:
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
                optimizers.update(optimizer_params(name, value))
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
        planner = nested_paths(planner, optimizers)  # DCP nests keys by these paths
        md = Metadata(state_dict_metadata=sd_meta, planner_data=planner, storage_data=storage_data)
        md.version = _dcp_version()
        with open(os.path.join(tmp, DCP_METADATA), "wb") as f:
            pickle.dump(md, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(dst):
            import shutil

            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertSummary(
        tensors=n_tensors,
        bytes=total,
        files=1,
        seconds=time.perf_counter() - t0,
        skipped=per_rank,
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
