"""Writing a stashpoint checkpoint from a stream of tensors and values (used by every import).

The checkpoint is published by :class:`~stashpoint.engine.publish.StreamedCheckpoint`
(staged, then committed atomically; an existing one is refused without ``overwrite``).
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

from stashpoint._state.values import encode_object
from stashpoint.convert.experts import ExpertSplit, JoinedExperts, plan_joins, stack_experts
from stashpoint.engine.publish import StreamedCheckpoint
from stashpoint.engine.reader import CheckpointReader
from stashpoint.engine.records import EncodedValue
from stashpoint.engine.tensors import as_bytes
from stashpoint.errors import InconsistentStateError, InvalidStateError, PickleNotAllowedError
from stashpoint.format.dtypes import dtype_from_name
from stashpoint.format.index import ObjectRecord, PerRankRecord, TensorRecord


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
    t0 = time.perf_counter()
    out = StreamedCheckpoint(dst, overwrite=overwrite, user={"imported_from": source})
    for t in tensors:

        def fetch(t: SourceTensor = t) -> memoryview:
            data = t.fetch()
            if data.dtype != t.dtype or tuple(data.shape) != tuple(t.shape):
                raise InvalidStateError(
                    f"{t.name!r}: source gave {data.dtype}{list(data.shape)}, "
                    f"expected {t.dtype}{list(t.shape)}"
                )
            view = as_bytes(data.contiguous())
            if progress is not None:
                progress(t.name, len(view))
            return view

        out.add_tensor(t.name, t.dtype, tuple(t.shape), fetch)
    for name, value in values.items():
        encoding, payload = encode_object(value, name, allow_pickle=True)  # refused below
        if encoding != "json" and not allow_pickle:
            raise PickleNotAllowedError(
                f"{name!r} ({type(value).__name__}) can only be stored pickled; pass allow_pickle=True "
                "to store it that way"
            )
        out.add_value(name, EncodedValue(encoding=encoding, payload=payload))
    size = out.publish()
    return ConvertSummary(
        tensors=len(tensors),
        bytes=size,
        files=out.file_count,
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
    experts: Sequence[ExpertSplit] = (),
) -> ConvertSummary:
    """Any checkpoint stashpoint can read (its own, DCP, HF) -> a stashpoint checkpoint.

    Tensors are read whole, one at a time, when the writer reaches them.  ``rename``
    maps each name to its new name, or to None to leave the item out.  ``experts`` join
    per-expert tensors into grouped ones (named by the source's names, then renamed).
    """
    reader = CheckpointReader.open(src)
    index = reader.index
    values, skipped = {}, []
    joins = plan_joins(sorted(index.items), experts, reader.where)
    joined = {name for j in joins for name in j.experts}
    tensors = [s for s in (_joined_source(reader, j, rename) for j in joins) if s is not None]
    for name in sorted(index.items):
        rec = index.items[name]
        if name in joined:
            continue
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


def _joined_source(
    reader: CheckpointReader, join: JoinedExperts, rename: Callable[[str], str | None] | None
) -> SourceTensor | None:
    """The grouped tensor rebuilt from its experts (None when ``rename`` leaves it out)."""
    new = rename(join.name) if rename is not None else join.name
    if new is None:
        return None
    recs = [reader.index.items[n] for n in join.experts]
    if not all(isinstance(r, TensorRecord) for r in recs) or len({(r.dtype, r.shape) for r in recs}) != 1:
        raise InconsistentStateError(f"{reader.where}: the experts of {join.name!r} differ in dtype or shape")
    first = recs[0]
    shape = (len(recs), *join.rule.slice_shape((0, *first.shape)))
    return SourceTensor(
        new,
        dtype_from_name(first.dtype),
        shape,
        lambda: stack_experts(join, lambda n: reader.read_tensor(n, reader.index.items[n])),
    )
