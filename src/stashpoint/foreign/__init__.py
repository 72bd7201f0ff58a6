"""Other tools' checkpoints, read in place: detection, and description as a stashpoint index.

PyTorch DCP checkpoints and HF safetensors directories are described as an
:class:`~stashpoint.format.index.Index` whose chunks point at the bytes in the other
tool's files, so the engine reads them like its own checkpoints (without checksums).
``torch.save`` files are only detected here; they are imported by
:mod:`stashpoint.convert.torch_save`.  This package sits below the engine: it uses
format/, planning/, storage/ and errors only.
"""

from __future__ import annotations

from stashpoint.foreign.dcp import DCP_METADATA, TORCH_PICKLE, dcp_index, is_dcp
from stashpoint.foreign.hf import HF_INDEX, hf_config, hf_index, is_hf_dir
from stashpoint.foreign.paths import member
from stashpoint.foreign.torch_save import is_torch_save
from stashpoint.format.index import INDEX_FILE, Index
from stashpoint.storage import Storage
from stashpoint.vocab import CheckpointFormat


def detect_format(storage: Storage, path: str) -> CheckpointFormat | None:
    """Which format ``path`` holds, judged by the files present (None: none we read).

    A stashpoint index wins over anything else in the same directory, then DCP's
    ``.metadata``, then HF safetensors, then ``torch.save`` (a file, or a directory
    of ``pytorch_model.bin`` shards).
    """
    if storage.exists(storage.join(path, INDEX_FILE)):
        return "stashpoint"
    if is_dcp(storage, path):
        return "dcp"
    if is_hf_dir(storage, path):
        return "hf"
    if is_torch_save(storage, path):
        return "torch_save"
    return None


def foreign_index(
    storage: Storage, path: str, fmt: CheckpointFormat, *, follow_symlinks: bool = False
) -> Index | None:
    """The index describing a DCP or HF checkpoint at ``path``; None for other formats."""
    if fmt == "dcp":
        return dcp_index(storage, path, follow_symlinks=follow_symlinks)
    if fmt == "hf":
        return hf_index(storage, path, follow_symlinks=follow_symlinks)
    return None


__all__ = [
    "DCP_METADATA",
    "HF_INDEX",
    "TORCH_PICKLE",
    "detect_format",
    "foreign_index",
    "hf_config",
    "member",
]
