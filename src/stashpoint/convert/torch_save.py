"""``torch.save`` files (``.pt``, ``.bin``, HF ``pytorch_model.bin`` shards) into stashpoint.

Files are opened with ``torch.load(weights_only=True, mmap=True)``: tensors, plain
containers and numbers only, and tensor data paged in from the file as it is copied.
Files that need a full unpickler are read only with ``allow_pickle=True`` (which runs
code from the file: use it only for files you trust).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import torch

from stashpoint.convert.stream import ConvertSummary, SourceTensor, write_checkpoint
from stashpoint.errors import IndexCorruptError, PickleNotAllowedError
from stashpoint.foreign.torch_save import BIN_INDEX, torch_save_files

__all__ = ["BIN_INDEX", "import_torch_save", "torch_save_files"]

def _load(path: str, allow_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except pickle.UnpicklingError as exc:
        raise PickleNotAllowedError(
            f"{path} holds objects that weights-only loading refuses ({exc}); pass "
            "allow_pickle=True only if you trust the file"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise IndexCorruptError(f"{path}: not a readable torch.save file: {exc}") from exc


def _flatten(value: object, prefix: str) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, value


def import_torch_save(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prefix: str = "",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress=None,
) -> ConvertSummary:
    """Turn ``torch.save`` file(s) into a stashpoint checkpoint.

    Nested dicts become dotted names (as stashpoint and DCP flatten them); ``prefix``
    is put in front of every name (``"model."`` makes an HF ``pytorch_model.bin`` load
    into ``{"model": module}``).
    """
    tensors: list[SourceTensor] = []
    values: dict[str, object] = {}
    seen: set[str] = set()
    for path in torch_save_files(os.fspath(src)):
        # each tensor's fetch keeps its mmap'd storage alive until the writer copies it
        for name, value in _flatten(_load(path, allow_pickle), ""):
            name = prefix + name
            if name in seen:
                raise IndexCorruptError(f"{path}: {name!r} appears more than once")
            seen.add(name)
            if isinstance(value, torch.Tensor):
                tensors.append(SourceTensor(name, value.dtype, tuple(value.shape), lambda v=value: v))
            else:
                values[name] = value
    return write_checkpoint(
        dst,
        tensors,
        values,
        source="torch.save",
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        progress=progress,
    )
