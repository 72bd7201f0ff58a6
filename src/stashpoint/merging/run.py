"""Running a merge: open the inputs, plan, stream every tensor through its method, write.

Linear methods (and the winners of searches) read one input at a time and add it
into an fp32 accumulator, skipping inputs whose coefficient is zero; tensor methods
read the tensor from every input, then compute.  Either way one tensor name is in
memory at a time, so peak memory follows the largest tensor, not the model.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from stashpoint.errors import MergeWeightsError
from stashpoint.format.dtypes import dtype_from_name
from stashpoint.merging.config import MergeConfig
from stashpoint.merging.hf_files import copy_hf_files
from stashpoint.merging.inputs import Source, open_input
from stashpoint.merging.methods import TensorInputs
from stashpoint.merging.plan import BASE, COPY, MergePlan, TensorPlan, plan_merge
from stashpoint.merging.registry import TENSOR
from stashpoint.merging.search import SearchResult
from stashpoint.merging.weights import LinearWeights, WeightContext


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: every tensor merged, copied or skipped (with why), and its cost."""

    output: str
    method: str
    output_format: str
    merged: tuple[str, ...]
    copied: tuple[str, ...]
    skipped: dict[str, str]
    #: coefficients of the models (and the base) for linear methods and searches
    weights: tuple[float, ...] | None
    base_weight: float | None
    bytes_read: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = ()
    search: SearchResult | None = field(default=None)

    @property
    def read_gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("output", "method", "output_format", "weights", "base_weight")}
        out.update(
            merged=list(self.merged),
            copied=list(self.copied),
            skipped=dict(self.skipped),
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            seconds=self.seconds,
            notes=list(self.notes),
        )
        if self.search is not None:
            out["search"] = self.search.to_json()
        return out


class Progress:
    """A one-line progress bar on stderr (tensors done, bytes read, GB/s)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = self.last = time.perf_counter()

    def step(self, bytes_read: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = bytes_read / 1e9 / max(now - self.t0, 1e-9)
        sys.stderr.write(
            f"\rmerge [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} tensors, "
            f"{bytes_read / 1e9:.2f} GB read, {rate:.2f} GB/s"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class Inputs:
    models: list[Source]
    base: Source | None

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.models) + (self.base.bytes_read if self.base else 0)


def open_inputs(cfg: MergeConfig) -> Inputs:
    models = [open_input(m.path, prefix=cfg.prefix, verify=cfg.verify) for m in cfg.models]
    base = open_input(cfg.base_model, prefix=cfg.prefix, verify=cfg.verify) if cfg.base_model else None
    return Inputs(models, base)


def weight_context(cfg: MergeConfig, inputs: Inputs) -> WeightContext:
    return WeightContext(
        method=cfg.method,
        params=cfg.params(),
        model_params=tuple(cfg.model_params(i) for i in range(len(cfg.models))),
        labels=tuple(s.label for s in inputs.models),
        steps=tuple(s.step for s in inputs.models),
        user=tuple(s.user for s in inputs.models),
    )


def _available(lw: LinearWeights, tp: TensorPlan, n: int) -> list[tuple[int, float]]:
    """Coefficients over the models holding the tensor, rescaled to keep their sum (union)."""
    coeffs = [(i, lw.models[i]) for i in tp.present]
    if len(tp.present) == n:
        return coeffs
    total, avail = math.fsum(lw.models), math.fsum(c for _, c in coeffs)
    if avail == 0.0 or total == 0.0:
        raise MergeWeightsError(
            f"tensor {tp.name!r}: the weights of the inputs holding it sum to {avail} (all inputs: "
            f"{total}); they cannot be renormalised"
        )
    return [(i, c * total / avail) for i, c in coeffs]


class Prefetcher:
    """Reads input tensors in a background thread, one ahead of their use.

    The order of all reads is known from the plan, so while the caller adds one
    tensor into its accumulator (or the writer checksums and writes the previous
    output) the next tensor is already being read.  At most one read is ahead, so
    memory grows by one input tensor at most.
    """

    def __init__(self, inputs: Inputs, order: Iterator[tuple[int, str]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._inputs, self._order = inputs, order
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="merge-read")
        self._queue: deque = deque()
        self._schedule()

    def _schedule(self) -> None:
        nxt = next(self._order, None)
        if nxt is not None:
            i, name = nxt
            src = self._inputs.base if i == BASE else self._inputs.models[i]
            self._queue.append((nxt, self._pool.submit(src.read, name)))

    def take(self, i: int, name: str) -> torch.Tensor:
        key, fut = self._queue.popleft()
        if key != (i, name):  # the schedule and the computation disagree: a bug, not bad input
            raise RuntimeError(f"merge read order: expected {key}, asked for {(i, name)}")
        self._schedule()
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Engine:
    """Computes one output tensor at a time for a plan."""

    def __init__(self, cfg: MergeConfig, inputs: Inputs, linear: LinearWeights | None) -> None:
        self.cfg, self.inputs, self.linear = cfg, inputs, linear
        self.device = torch.device(cfg.device)
        self.cast = None
        if cfg.dtype:
            self.cast = dtype_from_name(cfg.dtype)
        self._prefetch: Prefetcher | None = None

    def start(self, plans: tuple[TensorPlan, ...]) -> None:
        """Begin reading ahead; ``compute`` must then be called for ``plans`` in order."""
        self._prefetch = Prefetcher(self.inputs, (r for tp in plans for r in self.reads_for(tp)))

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()

    def reads_for(self, tp: TensorPlan) -> list[tuple[int, str]]:
        """The (input, name) reads ``compute(tp)`` makes, in order."""
        if tp.action == COPY:
            return [(tp.source, tp.name)]
        if self.linear is not None:
            return [(i, tp.name) for i, _ in self._terms(tp, self.linear)]
        reads = [(BASE, tp.name)] if tp.has_base else []
        reads += [(i, tp.name) for i in tp.present]
        if tp.moments is not None:
            reads += list(zip(tp.present, tp.moments))
        return reads

    def _raw(self, i: int, name: str) -> torch.Tensor:
        if self._prefetch is not None:
            return self._prefetch.take(i, name)
        return (self.inputs.base if i == BASE else self.inputs.models[i]).read(name)

    def _read(self, i: int, name: str, acc: torch.dtype | None) -> torch.Tensor:
        """Input ``i``'s tensor on the device, in ``acc`` (or as stored, rounded to ``dtype``)."""
        x = self._raw(i, name)
        if self.cast is not None:
            x = x.to(self.cast)  # inputs are rounded to the configured dtype first
        return x.to(self.device) if acc is None else x.to(self.device, acc)

    def compute(self, tp: TensorPlan) -> torch.Tensor:
        if tp.action == COPY:
            return self._raw(tp.source, tp.name)
        if self.linear is not None:
            out = self._linear(tp, self.linear)
        else:
            out = self._tensor(tp)
        return out.to("cpu", tp.out_dtype)

    def _terms(self, tp: TensorPlan, lw: LinearWeights) -> list[tuple[int, float]]:
        terms = _available(lw, tp, len(self.inputs.models))
        if tp.has_base and lw.base != 0.0:
            terms = [(BASE, lw.base), *terms]
        return [(i, c) for i, c in terms if c != 0.0]  # never read an input that does not contribute

    def _linear(self, tp: TensorPlan, lw: LinearWeights) -> torch.Tensor:
        acc = None
        for i, c in self._terms(tp, lw):
            if acc is None:
                acc = self._read(i, tp.name, tp.acc_dtype).mul_(c)
            else:  # added as stored: no widened copy of each input
                acc.add_(self._read(i, tp.name, None), alpha=c)
        return acc if acc is not None else torch.zeros(tp.shape, dtype=tp.acc_dtype, device=self.device)

    def _tensor(self, tp: TensorPlan) -> torch.Tensor:
        cfg = self.cfg
        base = self._read(BASE, tp.name, tp.acc_dtype) if tp.has_base else None
        models = [self._read(i, tp.name, tp.acc_dtype) for i in tp.present]
        moments = None
        if tp.moments is not None:
            moments = [self._read(i, k, tp.acc_dtype) for i, k in zip(tp.present, tp.moments)]
        t = TensorInputs(
            name=tp.name,
            base=base,
            models=models,
            params=[cfg.model_params(i) for i in tp.present],
            globals=cfg.params(),
            indices=list(tp.present),
            moments=moments,
        )
        return cfg.spec.fn(t)


def execute(
    cfg: MergeConfig,
    inputs: Inputs,
    plan: MergePlan,
    out: str,
    *,
    linear: LinearWeights | None,
    overwrite: bool,
    progress: bool,
) -> MergeReport:
    """Write the merge of ``plan`` to ``out``; ``linear`` gives coefficients for non-tensor methods."""
    t0 = time.perf_counter()
    read0 = inputs.bytes_read
    engine = Engine(cfg, inputs, None if cfg.spec.kind == TENSOR else linear)
    bar = Progress(len(plan.tensors), progress)

    def compute(tp: TensorPlan) -> torch.Tensor:
        result = engine.compute(tp)
        bar.step(inputs.bytes_read - read0)
        return result

    engine.start(plan.tensors)
    try:
        written = _write(cfg, inputs, plan, out, linear, compute, overwrite)
    finally:
        engine.close()
    return MergeReport(
        output=out,
        method=cfg.method,
        output_format=cfg.output_format,
        merged=tuple(tp.name for tp in plan.tensors if tp.action != COPY),
        copied=tuple(tp.name for tp in plan.tensors if tp.action == COPY),
        skipped=dict(sorted(plan.skipped.items())),
        weights=tuple(linear.models) if linear is not None else None,
        base_weight=linear.base if linear is not None else None,
        bytes_read=inputs.bytes_read - read0,
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        notes=plan.notes,
    )


def _write(
    cfg: MergeConfig,
    inputs: Inputs,
    plan: MergePlan,
    out: str,
    linear: LinearWeights | None,
    compute: Callable[[TensorPlan], torch.Tensor],
    overwrite: bool,
) -> int:
    from stashpoint.merging.writer import write_hf, write_stashpoint

    if cfg.output_format == "hf":
        return write_hf(
            out,
            plan.tensors,
            compute,
            cfg.prefix,
            cfg.max_shard_size,
            overwrite,
            side_files=lambda staging: write_side_files(cfg, inputs, plan, staging),
        )
    user = {
        "merge": {
            "method": cfg.method,
            "models": [m.path for m in cfg.models],
            "base_model": cfg.base_model,
            "weights": list(linear.models) if linear is not None else None,
        }
    }
    steps = [s.step for s in inputs.models if s.step is not None]
    return write_stashpoint(out, plan.tensors, compute, user, max(steps) if steps else None, overwrite)


def write_side_files(cfg: MergeConfig, inputs: Inputs, plan: MergePlan, out: str) -> tuple[str, ...]:
    """Beside an HF output: the base's (or first model's) config and tokenizer, and the merge config."""
    ref_src, ref_path = (
        (inputs.base, cfg.base_model) if inputs.base is not None else (inputs.models[0], cfg.models[0].path)
    )
    local = ref_src.kind == "huggingface" and ref_path is not None and os.path.isdir(ref_path)
    dtypes = {tp.out_dtype for tp in plan.tensors if tp.action != COPY}
    return copy_hf_files(
        out, ref_path if local else None, cfg.to_doc(), dtypes.pop() if len(dtypes) == 1 else None
    )


def plan_for(cfg: MergeConfig, inputs: Inputs) -> MergePlan:
    return plan_merge(cfg, inputs.models, inputs.base)
