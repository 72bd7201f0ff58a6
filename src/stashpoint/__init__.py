"""stashpoint: open, sharded, resharding checkpoints for PyTorch training.

The public API is small:

* :func:`save` / :func:`load`: every rank calls them; load fills the targets in
  whatever layout they have now (any world size, FSDP2, TP, DDP, one process).
* :func:`load_full` / :func:`iter_full`: whole CPU tensors for tools and evaluation.
* :func:`read_index`: the checkpoint's JSON index as dataclasses.
* :func:`merge`: averages, soups and merges of fine-tunes, streamed tensor by tensor.
* :class:`PerRank`, :class:`OptimizerState`: wrappers that say how to treat a value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from stashpoint import errors
from stashpoint._version import __version__
from stashpoint.engine.telemetry import LoadResult, SaveResult
from stashpoint.format.index import Index
from stashpoint.vocab import IfBusy, SaveMode
from stashpoint.wrappers import OptimizerState, PerRank

if TYPE_CHECKING:  # the merge package and the async engine are imported on first use only
    from stashpoint.engine.async_save import SaveHandle
    from stashpoint.merging.config import MergeConfig
    from stashpoint.merging.run import MergeReport

PathLike = str | os.PathLike


def save(
    state: dict,
    path: PathLike,
    *,
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
) -> SaveResult:
    """Save ``state`` to ``path``; a collective: every rank of the group calls it.

    ``state`` maps names to modules, optimizers, objects with ``state_dict()`` /
    ``load_state_dict()``, tensors, DTensors, nested dicts/lists and plain values.
    Each rank writes only its own shards; replicated data is written once.  The
    checkpoint appears atomically when every rank's data is durable.  Raises
    :class:`~stashpoint.errors.CheckpointExistsError` unless ``overwrite``.
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
) -> SaveHandle:
    """Start a save and return a :class:`~stashpoint.engine.async_save.SaveHandle` at once.

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
    """
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
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank="error",
    process_group=None,
    timeout_s: float = 600.0,
) -> LoadResult:
    """Load ``path`` into ``state`` in place; a collective: every rank calls it.

    Targets keep their current layout: each rank reads only the byte ranges that
    overlap its shards.  Everything is validated and read before any target is
    written, so a failed load changes nothing.  ``strict`` makes missing and
    unexpected keys errors (keys under names not in ``state`` are ignored).
    ``per_rank`` says what to do with per-rank items saved at another world size:
    ``"error"``, ``"drop"`` (leave the target as is), ``"rank0"``, or a function
    ``(name, values, rank, world_size) -> value``.
    """
    from stashpoint.engine.load import load_state

    return load_state(
        state,
        os.fspath(path),
        strict=strict,
        verify=verify,
        allow_pickle=allow_pickle,
        per_rank=per_rank,
        process_group=process_group,
        timeout_s=timeout_s,
    )


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


__all__ = [
    "Index",
    "LoadResult",
    "OptimizerState",
    "PerRank",
    "SaveResult",
    "__version__",
    "async_save",
    "async_warmup",
    "errors",
    "iter_full",
    "load",
    "load_full",
    "merge",
    "read_index",
    "save",
]
