"""Writing a stashpoint checkpoint from a stream of tensors and values (used by every import).

Each tensor is fetched only when the writer reaches it and dropped after its bytes are
written, so peak memory is about one tensor, whatever the size of the model.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from stashpoint.errors import CheckpointExistsError, PickleNotAllowedError


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion did: counts, bytes, wall time and the process's peak RSS."""

    tensors: int
    bytes: int
    files: int
    seconds: float
    skipped: tuple[str, ...]
    values: int = 0
    peak_rss_bytes: int = 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class SourceTensor:
    """A tensor to import: its name, dtype and shape up front, its data on demand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor]


Progress = Callable[[str, int], None]


def write_checkpoint(
    dst: str | os.PathLike,
    tensors: Sequence[SourceTensor],
    values: Mapping[str, object],
    *,
    source: str,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Write ``tensors`` and ``values`` as a committed stashpoint checkpoint at ``dst``.

    Values that tagged JSON cannot hold exactly are pickled only with ``allow_pickle``.
    ``progress(name, nbytes)`` is called after each tensor is fetched.
    """
    from stashpoint._state import encode_object
    from stashpoint.engine.persist import (
        FileItem,
        Written,
        build_index,
        commit_index,
        data_file_name,
        write_data_file,
    )
    from stashpoint.engine.save import save_metadata
    from stashpoint.engine.telemetry import PhaseTimer
    from stashpoint.engine.tensors import as_bytes
    from stashpoint.format.dtypes import dtype_name, itemsize
    from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
    from stashpoint.format.safetensors_file import FileEntry
    from stashpoint.planning.save_plan import GLOBAL, ItemPlan
    from stashpoint.storage import resolve
    from stashpoint.storage.commit import default_commit

    t0 = time.perf_counter()
    storage, final = resolve(dst)
    if storage.exists(final) and not overwrite:
        raise CheckpointExistsError(f"{storage.describe(final)} already exists; pass overwrite=True")
    items: list[FileItem] = []
    plan: dict[str, ItemPlan] = {}
    inline: list[Written] = []
    for t in tensors:
        numel = 1
        for n in t.shape:
            numel *= n

        def fetch(t: SourceTensor = t) -> memoryview:
            data = t.fetch()
            if data.dtype != t.dtype or tuple(data.shape) != tuple(t.shape):
                from stashpoint.errors import InvalidStateError

                raise InvalidStateError(
                    f"{t.name!r}: source gave {data.dtype}{list(data.shape)}, "
                    f"expected {t.dtype}{list(t.shape)}"
                )
            view = as_bytes(data.contiguous())
            if progress is not None:
                progress(t.name, len(view))
            return view

        entry = FileEntry(t.name, t.dtype, tuple(t.shape), numel * itemsize(t.dtype))
        items.append(FileItem(t.name, False, entry, dtype_name(t.dtype), (0,) * len(t.shape), fetch))
        plan[t.name] = ItemPlan(t.name, True, GLOBAL, dtype_name(t.dtype), tuple(t.shape), None, "")
    for name, value in values.items():
        encoding, payload = encode_object(value, name, allow_pickle=True)  # refused below
        plan[name] = ItemPlan(name, False, GLOBAL, "", (), None, encoding)
        if encoding == "json":
            inline.append(Written(name, False, json_text=payload.decode()))
            continue
        if not allow_pickle:
            raise PickleNotAllowedError(
                f"{name!r} ({type(value).__name__}) can only be stored pickled; pass allow_pickle=True "
                "to store it that way"
            )
        blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        entry = FileEntry(name, torch.uint8, (len(payload),), len(payload))
        items.append(FileItem(name, False, entry, "", (0,), lambda blob=blob: as_bytes(blob)))

    commit = default_commit(storage)
    staging = commit.staging_path(storage, final, f"import{os.getpid()}-{int(t0 * 1000) % 10**9}")
    storage.make_prefix(staging)
    timer = PhaseTimer()
    try:
        written, size = write_data_file(
            storage, staging, data_file_name(0), items, DEFAULT_CRC_BLOCK_BYTES, timer, threads=1
        )
        index = build_index(
            plan,
            [written + inline],
            save_metadata(1, None, {"imported_from": source}),
            DEFAULT_CRC_BLOCK_BYTES,
        )
        commit_index(storage, staging, final, commit, index, overwrite, timer)
    except BaseException:
        if staging != final:
            commit.abort(storage, staging, final)
        raise
    return ConvertSummary(
        tensors=len(tensors),
        bytes=size,
        files=1 if items else 0,
        seconds=time.perf_counter() - t0,
        skipped=(),
        values=len(values),
        peak_rss_bytes=peak_rss_bytes(),
    )


def copy_to_stashpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    source: str,
    rename: Callable[[str], str | None] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Any checkpoint stashpoint can read (its own, DCP, HF) -> a stashpoint checkpoint.

    Tensors are read whole, one at a time, when the writer reaches them.  ``rename``
    maps each name to its new name, or to None to leave the item out.
    """
    from stashpoint.engine.reader import CheckpointReader
    from stashpoint.format.dtypes import dtype_from_name
    from stashpoint.format.index import ObjectRecord, PerRankRecord, TensorRecord

    reader = CheckpointReader.open(src)
    index = reader.index
    tensors, values, skipped = [], {}, []
    for name in sorted(index.items):
        rec = index.items[name]
        new = rename(name) if rename is not None else name
        if new is None or isinstance(rec, PerRankRecord):
            skipped.append(name)
            continue
        if isinstance(rec, TensorRecord):
            tensors.append(
                SourceTensor(
                    new,
                    dtype_from_name(rec.dtype),
                    tuple(rec.shape),
                    lambda name=name, rec=rec: reader.read_tensor(name, rec),
                )
            )
        elif isinstance(rec, ObjectRecord):
            values[new] = reader.read_value(name, rec, allow_pickle=allow_pickle)
    summary = write_checkpoint(
        dst, tensors, values, source=source, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress
    )
    return ConvertSummary(**{**summary.__dict__, "skipped": tuple(skipped)})
