"""Writing merged tensors as they are computed: a stashpoint checkpoint or an HF directory.

Shapes and dtypes of the output are known from the plan, so file headers are laid
out first and each tensor is computed only when its bytes are due; one merged
tensor is held at a time.  The stashpoint output goes through the same data-file
writer and commit as a save (checksums, atomic publish); the HF output through the
shard writer of :mod:`stashpoint.convert.hf`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import torch

from stashpoint.engine.hf_shards import ShardRow, write_hf_files
from stashpoint.engine.publish import StreamedCheckpoint, staged_directory
from stashpoint.engine.tensors import as_bytes
from stashpoint.merging.plan import TensorPlan

Compute = Callable[[TensorPlan], torch.Tensor]


def write_stashpoint(
    out: str, plans: tuple[TensorPlan, ...], compute: Compute, user: dict, step: int | None, overwrite: bool
) -> int:
    """One data file written tensor by tensor, then the index; returns the data bytes."""
    ckpt = StreamedCheckpoint(out, overwrite=overwrite, step=step, user=user)
    for tp in plans:

        def fetch(tp: TensorPlan = tp) -> memoryview:
            return as_bytes(compute(tp).contiguous())

        ckpt.add_tensor(tp.name, tp.out_dtype, tp.shape, fetch)
    ckpt.publish()
    return sum(tp.out_nbytes for tp in plans)


def write_hf(
    out: str,
    plans: tuple[TensorPlan, ...],
    compute: Compute,
    prefix: str,
    max_shard_bytes: int,
    overwrite: bool,
    side_files: Callable[[str], object] | None = None,
) -> int:
    """``model.safetensors`` or shards plus the index json; names lose ``prefix``.

    ``side_files(directory)`` writes what goes beside the weights (config, tokenizer)
    into the staged directory, so they appear with the weights, in the same swap.
    """
    by_name = {tp.name: tp for tp in plans}

    def stream(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in keys:
            yield name, compute(by_name[name])

    rows = [
        ShardRow(hf_name=tp.name[len(prefix) :], source=tp.name, shape=tuple(tp.shape), dtype=tp.out_dtype)
        for tp in plans
    ]
    # staged and swapped in at once: an earlier output's shards never mix with these
    with staged_directory(out, overwrite=overwrite) as staging:
        total, _ = write_hf_files(staging, rows, stream, max_shard_bytes)
        if side_files is not None:
            side_files(staging)
    return total


def remove_output(path: str) -> None:
    """Delete a candidate written during a search (either format)."""
    shutil.rmtree(path, ignore_errors=True)
