"""Writing merged tensors as they are computed: a stashpoint checkpoint or an HF directory.

Shapes and dtypes of the output are known from the plan, so file headers are laid
out first and each tensor is computed only when its bytes are due; one merged
tensor is held at a time.  The stashpoint output goes through the same data-file
writer and commit as a save (checksums, atomic publish); the HF output through the
shard writer of :mod:`stashpoint.convert.hf`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import torch

from stashpoint.errors import CheckpointExistsError
from stashpoint.merging.plan import TensorPlan

Compute = Callable[[TensorPlan], torch.Tensor]


def write_stashpoint(
    out: str, plans: tuple[TensorPlan, ...], compute: Compute, user: dict, step: int | None, overwrite: bool
) -> int:
    """One data file written tensor by tensor, then the index; returns the data bytes."""
    from stashpoint.engine.persist import FileItem, build_index, commit_index, data_file_name, write_data_file
    from stashpoint.engine.save import save_metadata
    from stashpoint.engine.telemetry import PhaseTimer
    from stashpoint.engine.tensors import as_bytes
    from stashpoint.format.dtypes import dtype_name
    from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
    from stashpoint.format.safetensors_file import FileEntry
    from stashpoint.planning.save_plan import GLOBAL, ItemPlan
    from stashpoint.storage import resolve
    from stashpoint.storage.commit import default_commit

    storage, final = resolve(out)
    if storage.exists(final) and not overwrite:
        raise CheckpointExistsError(f"{storage.describe(final)} already exists; pass overwrite=True")
    commit = default_commit(storage)
    staging = commit.staging_path(storage, final, f"merge{os.getpid()}")
    storage.make_prefix(staging)
    items, plan_items = [], {}
    for tp in plans:

        def fetch(tp: TensorPlan = tp) -> memoryview:
            return as_bytes(compute(tp).contiguous())

        entry = FileEntry(tp.name, tp.out_dtype, tp.shape, tp.out_nbytes)
        name = dtype_name(tp.out_dtype)
        items.append(FileItem(tp.name, False, entry, name, (0,) * len(tp.shape), fetch))
        plan_items[tp.name] = ItemPlan(tp.name, True, GLOBAL, name, tp.shape, None, "")
    timer = PhaseTimer()
    # one thread: items are fetched (computed) one after the other and each is written
    # before the next is computed, which is what bounds memory
    written, size = write_data_file(
        storage, staging, data_file_name(0), items, DEFAULT_CRC_BLOCK_BYTES, timer, threads=1
    )
    index = build_index(plan_items, [written], save_metadata(1, step, user), DEFAULT_CRC_BLOCK_BYTES)
    commit_index(storage, staging, final, commit, index, overwrite, timer)
    return sum(tp.out_nbytes for tp in plans)


def write_hf(
    out: str,
    plans: tuple[TensorPlan, ...],
    compute: Compute,
    prefix: str,
    max_shard_bytes: int,
    overwrite: bool,
) -> int:
    """``model.safetensors`` or shards plus the index json; names lose ``prefix``."""
    from stashpoint.convert.hf import HF_INDEX, write_hf_files

    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise CheckpointExistsError(f"{out} already exists and is not empty; pass overwrite=True")
        for n in os.listdir(out):  # stale shards of an earlier output must not linger
            if n.endswith(".safetensors") or n == HF_INDEX:
                os.remove(os.path.join(out, n))
    os.makedirs(out, exist_ok=True)
    by_name = {tp.name: tp for tp in plans}

    def stream(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in keys:
            yield name, compute(by_name[name])

    rows = [(tp.name[len(prefix) :], tp.name, tp) for tp in plans]
    total, _ = write_hf_files(out, rows, lambda tp: tp.out_dtype, stream, max_shard_bytes)
    return total


def remove_output(path: str) -> None:
    """Delete a candidate written during a search (either format)."""
    shutil.rmtree(path, ignore_errors=True)
