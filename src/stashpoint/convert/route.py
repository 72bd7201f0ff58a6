"""``stashpoint.convert(src, dst, to=...)``: which pipeline turns a source into a target.

The source's format is detected (:func:`detect_format`); the pipelines themselves are
the import/export functions of this package:

=====================  ==============================  ==============================
source                 ``to="stashpoint"``             ``to="hf"`` / ``to="dcp"``
=====================  ==============================  ==============================
stashpoint             copied (re-laid out, verified)  exported
PyTorch DCP            imported                        exported (read in place)
HF safetensors         imported, names gain ``prefix``  exported (read in place)
``torch.save`` files   imported, names gain ``prefix``  imported into a hidden staging
                                                       checkpoint beside ``dst``, then
                                                       exported; the staging is removed
=====================  ==============================  ==============================
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from stashpoint.convert.dcp import DCP_METADATA, export_dcp, import_dcp
from stashpoint.convert.hf import DEFAULT_SHARD_BYTES, export_hf, import_hf, strip_prefix
from stashpoint.convert.stream import ConvertSummary, copy_to_stashpoint
from stashpoint.convert.torch_save import import_torch_save
from stashpoint.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidOptionError,
    NotACheckpointError,
)
from stashpoint.foreign import detect_format
from stashpoint.format.dtypes import dtype_from_name
from stashpoint.format.index import INDEX_FILE
from stashpoint.sizes import parse_size
from stashpoint.storage import Storage, resolve
from stashpoint.vocab import CheckpointFormat, ConvertTarget, choose

PathLike = str | os.PathLike
#: ``progress(name, nbytes)`` after each tensor is copied
Progress = Callable[[str, int], None]



def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: ConvertTarget,
    overwrite: bool = False,
    allow_pickle: bool = False,
    prefix: str = "model.",
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | str | None = None,
    copy_files: tuple[PathLike, ...] = (),
    copy_from: PathLike | None = None,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the checkpoint at ``src`` (stashpoint, DCP, HF or ``torch.save``) into ``to``.

    Tensors are streamed one at a time.  ``prefix`` is the model's name prefix: HF and
    ``torch.save`` imports gain it (so the result loads into ``{"model": module}``) and
    an HF export keeps only names under it, without it.  ``max_shard_size`` (bytes or a
    size such as ``"2GB"``), ``dtype`` (floating tensors are cast to it) and
    ``copy_files`` (e.g. ``config.json``, relative to the source checkpoint or to
    ``copy_from``) apply to HF exports.  Values that need
    unpickling are read only with ``allow_pickle``.  Raises
    :class:`~stashpoint.errors.CheckpointExistsError` if ``dst`` exists, unless
    ``overwrite``.
    """
    to = choose("to", to, ConvertTarget)
    shard_bytes = parse_size(max_shard_size, "max_shard_size")
    cast = _dtype(dtype)
    src, dst = os.fspath(src), os.fspath(dst)
    storage, path = resolve(src)
    kind = detect_format(storage, path)
    if kind is None:
        raise _not_convertible(storage, path)
    out_storage, out_path = resolve(dst)
    if out_storage.exists(out_path) and not overwrite:
        raise CheckpointExistsError(
            f"{out_storage.describe(out_path)} already exists; pass overwrite=True to replace it"
        )
    if to == "stashpoint":
        return _import(kind, src, dst, overwrite, allow_pickle, prefix, progress)
    with _exportable(kind, src, dst, prefix, allow_pickle) as source:
        if to == "dcp":
            return export_dcp(source, dst, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
        return export_hf(
            source,
            dst,
            name_map=strip_prefix(prefix),
            max_shard_bytes=shard_bytes,
            dtype=cast,
            copy_files=tuple(copy_files),
            copy_from=copy_from,
            progress=progress,
            overwrite=overwrite,
        )


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if not isinstance(dtype, str):
        return dtype
    try:
        return dtype_from_name(dtype)
    except ValueError:
        raise InvalidOptionError(f"dtype: {dtype!r} is not a dtype name (e.g. 'bfloat16')") from None


def _import(
    kind: CheckpointFormat,
    src: str,
    dst: str,
    overwrite: bool,
    allow_pickle: bool,
    prefix: str,
    progress: Progress | None,
) -> ConvertSummary:
    if kind == "torch_save":
        return import_torch_save(
            src, dst, prefix=prefix, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress
        )
    if kind == "hf":
        return import_hf(src, dst, prefix=prefix, overwrite=overwrite, progress=progress)
    if kind == "dcp":
        return import_dcp(src, dst, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    return copy_to_stashpoint(
        src, dst, source="convert", overwrite=overwrite, allow_pickle=allow_pickle, progress=progress
    )


@contextmanager
def _exportable(kind: CheckpointFormat, src: str, dst: str, prefix: str, allow_pickle: bool) -> Iterator[str]:
    """A path the exporters read: ``src`` itself, or for ``torch.save`` files a checkpoint
    imported into a hidden directory beside ``dst`` (same disk), removed afterwards."""
    if kind != "torch_save":
        yield src
        return
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.convert-", dir=parent)
    try:
        staged = os.path.join(scratch, "ckpt")
        import_torch_save(src, staged, prefix=prefix, allow_pickle=allow_pickle)
        yield staged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _not_convertible(storage: Storage, path: str) -> Exception:
    where = storage.describe(path)
    if not storage.exists(path):
        return CheckpointNotFoundError(f"no checkpoint at {where}")
    return NotACheckpointError(
        f"{where} is not a checkpoint stashpoint can convert: no {INDEX_FILE} (an interrupted save "
        f"leaves none), DCP {DCP_METADATA}, HF safetensors or torch.save file"
    )
