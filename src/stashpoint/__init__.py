"""stashpoint: open, sharded, resharding checkpoints for PyTorch training.

The public API is small:

* :func:`save` / :func:`load`: every rank calls them; load fills the targets in
  whatever layout they have now (any world size, FSDP2, TP, DDP, one process).
* :func:`load_full` / :func:`iter_full`: whole CPU tensors for tools and evaluation.
* :func:`read_index`: the checkpoint's JSON index as dataclasses.
* :func:`merge`: averages, soups and merges of fine-tunes, streamed tensor by tensor.
* :func:`convert`: between stashpoint, PyTorch DCP, HF safetensors and ``torch.save``;
  :func:`load_hf`: an HF directory into a module.
* :class:`CheckpointManager`: when to save, what to keep, where to resume from.
* :class:`PerRank`, :class:`OptimizerState`: wrappers that say how to treat a value.

``import stashpoint`` does not import torch: the names that need it
(:class:`CheckpointManager`, :class:`SaveHandle`, :func:`load_hf`, :func:`convert`) are
imported on first use.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from stashpoint import errors, vocab
from stashpoint._version import __version__
from stashpoint.engine.telemetry import LoadResult, SaveResult
from stashpoint.format.index import Index
from stashpoint.planning.name_match import KeyDiff
from stashpoint.planning.names import ExpertLayout, StageLayout, stage_layouts
from stashpoint.planning.protection import Parity, Replicate
from stashpoint.vocab import IfBusy, PerRankChoice, SaveMode
from stashpoint.wrappers import OptimizerState, PerRank, WithLayout

if TYPE_CHECKING:  # imported on first use only: they need torch
    from stashpoint.convert.hf import load_hf
    from stashpoint.engine.async_save import SaveHandle
    from stashpoint.manager import CheckpointManager, ManagerConfig, MemoryPolicy, RetentionPolicy, SavePolicy
    from stashpoint.merging.config import MergeConfig
    from stashpoint.merging.run import MergeReport

PathLike = str | os.PathLike
#: the words ``load``'s ``per_rank`` accepts (besides a function)
LOAD_PER_RANK = ("error", "drop", "rank0")
#: public names imported on first use (they need torch), and the module that defines each
LAZY = {
    "CheckpointManager": "stashpoint.manager",
    "ManagerConfig": "stashpoint.manager",
    "MemoryPolicy": "stashpoint.manager",
    "RetentionPolicy": "stashpoint.manager",
    "SavePolicy": "stashpoint.manager",
    "SaveHandle": "stashpoint.engine.async_save",
    "load_hf": "stashpoint.convert",
}


def save(
    state: dict,
    path: PathLike,
    *,
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
    allow_pickle: bool = False,
) -> SaveResult:
    """Save ``state`` to ``path``; a collective: every rank of the group calls it.

    ``state`` maps names to modules, optimizers, objects with ``state_dict()`` /
    ``load_state_dict()``, tensors, DTensors, nested dicts/lists and plain values.
    Each rank writes only its own shards; replicated data is written once.  The
    checkpoint appears atomically when every rank's data is durable.  Raises
    :class:`~stashpoint.errors.CheckpointExistsError` unless ``overwrite``.  A value
    that JSON cannot hold exactly (a ``set``, a class instance) raises
    :class:`~stashpoint.errors.InvalidStateError` unless ``allow_pickle=True``, which
    stores it as pickle (and loading it then needs ``allow_pickle=True`` too).
    """
    from stashpoint.engine.save import save_state

    return save_state(
        state,
        os.fspath(path),
        step=step,
        metadata=metadata,
        overwrite=overwrite,
        process_group=process_group,
        timeout_s=timeout_s,
        allow_pickle=allow_pickle,
    )


def async_save(
    state: dict,
    path: PathLike,
    *,
    mode: SaveMode = "eager",
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    if_busy: IfBusy = "wait",
    process_group=None,
    timeout_s: float = 600.0,
    copy_engine=None,
    device_buffer: bool = False,
    allow_pickle: bool = False,
) -> SaveHandle:
    """Start a save and return a :class:`SaveHandle` at once.

    A collective like :func:`save`.  Tensors are copied into a host staging pool that
    is allocated once and reused; a background writer process persists and commits.
    ``mode="eager"`` returns once this rank's data is on the host; ``mode="lazy"``
    returns at once and the copies overlap the next forward/backward: the next
    ``optimizer.step()`` of an optimizer in ``state`` waits for them (tensors changed
    by other means before ``handle.wait_staged()`` may be saved changed).  With a save
    still persisting, ``if_busy="wait"`` waits for its buffer and ``"skip"`` returns a
    handle whose ``skipped`` is True.  The checkpoint is committed even if the
    training process dies after staging.  ``device_buffer=True`` first snapshots
    CUDA tensors into a reused device buffer (fast), so the next optimizer step waits
    only for that snapshot while the copy to the host overlaps later steps.
    ``allow_pickle`` is as for :func:`save`.
    """
    vocab.choose("mode", mode, SaveMode)
    vocab.choose("if_busy", if_busy, IfBusy)
    from stashpoint.engine.async_save import async_save_state

    return async_save_state(
        state,
        os.fspath(path),
        mode=mode,
        step=step,
        metadata=metadata,
        overwrite=overwrite,
        if_busy=if_busy,
        process_group=process_group,
        timeout_s=timeout_s,
        copy_engine=copy_engine,
        device_buffer=device_buffer,
        allow_pickle=allow_pickle,
    )


def async_warmup(state: dict, *, device_buffer: bool = False) -> int:
    """Start the background writer and allocate staging for ``state`` now (not a collective).

    Call it once after building the model and optimizer so that the first
    :func:`async_save` does not pay for starting the writer process and page-locking
    the staging memory (about 0.4 s per GB).  Returns the staging bytes held.
    """
    from stashpoint.engine.async_save import warmup

    return warmup(state, device_buffer=device_buffer)


def load(
    state: dict,
    path: PathLike,
    *,
    strict: bool = True,
    partial: bool = False,
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank: PerRankChoice | Callable[[str, list, int, int], object] = "error",
    process_group=None,
    timeout_s: float = 600.0,
    follow_symlinks: bool = False,
) -> LoadResult:
    """Load ``path`` into ``state`` in place; a collective: every rank calls it.

    Targets keep their current layout: each rank reads only the byte ranges that
    overlap its shards.  Everything is validated and read before any target is
    written, so a failed load changes nothing.  ``strict`` makes missing and
    unexpected keys errors (keys under names not in ``state`` are ignored);
    ``partial=True`` allows missing keys only: those targets keep their values and
    the result's ``unwritten`` names them.  Names are matched canonically
    (``docs/LAYOUTS.md``): a checkpoint of a compiled, activation-checkpointed or DDP
    module loads into the plain module and back; the result's ``renamed`` lists the
    names so matched.  :func:`diff_keys` shows the differences without loading.
    ``per_rank`` says what to do with per-rank items saved at another world size:
    ``"error"``, ``"drop"`` (leave the target as is), ``"rank0"``, or a function
    ``(name, values, rank, world_size) -> value``.  Files of the checkpoint that are
    symbolic links to outside it are refused unless ``follow_symlinks``.
    """
    if not callable(per_rank):
        vocab.choose("per_rank", per_rank, PerRankChoice, allowed=LOAD_PER_RANK)
    from stashpoint.engine.load import load_state

    return load_state(
        state,
        os.fspath(path),
        strict=strict,
        partial=partial,
        verify=verify,
        allow_pickle=allow_pickle,
        per_rank=per_rank,
        process_group=process_group,
        timeout_s=timeout_s,
        follow_symlinks=follow_symlinks,
    )


def diff_keys(state: dict, path: PathLike, *, rename: Callable[[str], str | None] | None = None) -> KeyDiff:
    """The names a load of ``path`` into ``state`` would leave ``missing``, find
    ``unexpected``, or match ``renamed`` (canonical names); only the index is read, and
    no other rank takes part.  ``print(diff.summary())`` for people."""
    from stashpoint.engine.key_diff import diff_keys as _diff_keys

    return _diff_keys(state, os.fspath(path), rename=rename)


def load_full(path: PathLike, keys: list[str] | None = None, **kwargs) -> dict[str, object]:
    """Full, unsharded CPU tensors (and plain values) by fully-qualified name.

    Options as for :func:`iter_full`.  Needs memory for all requested tensors; use
    :func:`iter_full` to hold one at a time.
    """
    from stashpoint.engine.load import load_full as _load_full

    return _load_full(os.fspath(path), keys, **kwargs)


def iter_full(path: PathLike, keys: list[str] | None = None, **kwargs):
    """Stream ``(name, value)`` pairs one at a time; see :func:`stashpoint.engine.load.iter_full`."""
    from stashpoint.engine.load import iter_full as _iter_full

    return _iter_full(os.fspath(path), keys, **kwargs)


def read_index(path: PathLike) -> Index:
    """The committed index of the checkpoint at ``path``."""
    from stashpoint.engine.reader import read_index as _read_index
    from stashpoint.storage import resolve

    storage, p = resolve(path)
    return _read_index(storage, p)


def merge(
    config: MergeConfig | Mapping[str, object] | PathLike | None = None,
    out: PathLike | None = None,
    *,
    models: list[PathLike] | None = None,
    method: str | None = None,
    base_model: PathLike | None = None,
    parameters: dict[str, bool | int | float | str] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    missing: str | None = None,
    output_format: str | None = None,
    device: str | None = None,
    evaluate: Callable[[str], float] | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Merge checkpoints into ``out``, one tensor at a time; returns a ``MergeReport``.

    ``config`` is a mergekit-style YAML/JSON file, a mapping or a ``MergeConfig``; or
    leave it out and pass ``models=[...]``, ``method="ema"``, ``parameters={...}``
    (keywords override the config).  Inputs are stashpoint checkpoints (any world size
    and layout) and HF safetensors directories; ``output_format="hf"`` writes an HF
    directory.  ``missing`` is ``"error"``, ``"intersection"`` or ``"union"``;
    ``evaluate`` (a callable ``path -> score`` or a command) drives ``greedy_soup`` and
    ``lcsc``.  Methods, formulas and defaults: ``docs/MERGING.md``.
    """
    from stashpoint.merging import merge as _merge

    return _merge(
        config,
        out,
        models=models,
        method=method,
        base_model=base_model,
        parameters=parameters,
        dtype=dtype,
        out_dtype=out_dtype,
        missing=missing,
        output_format=output_format,
        device=device,
        evaluate=evaluate,
        overwrite=overwrite,
        progress=progress,
    )


def __getattr__(name: str) -> object:
    """The torch-needing public names, imported when first asked for.

    ``convert`` is the :mod:`stashpoint.convert` package, which is callable as
    :func:`stashpoint.convert.convert` (a package binds itself to its parent's attribute
    of the same name when imported, so a function there would be replaced).
    """
    if name == "convert":
        return importlib.import_module("stashpoint.convert")
    if name in LAZY:
        value = getattr(importlib.import_module(LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stashpoint' has no attribute {name!r}")


__all__ = [
    "CheckpointManager",
    "ExpertLayout",
    "Index",
    "KeyDiff",
    "LoadResult",
    "ManagerConfig",
    "MemoryPolicy",
    "OptimizerState",
    "Parity",
    "PerRank",
    "Replicate",
    "RetentionPolicy",
    "SaveHandle",
    "SavePolicy",
    "SaveResult",
    "StageLayout",
    "WithLayout",
    "__version__",
    "async_save",
    "async_warmup",
    "convert",
    "diff_keys",
    "errors",
    "iter_full",
    "load",
    "load_full",
    "load_hf",
    "merge",
    "read_index",
    "save",
    "stage_layouts",
]
