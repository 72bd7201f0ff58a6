"""Grouped expert weights <-> HF's per-expert tensors: a split rule for exports and the
join for imports.

An expert-parallel MoE keeps each projection of all experts in one tensor whose first
dimension is the expert (``[num_experts, dim, hidden]``, sharded ``Shard(0)`` over the EP
mesh); HF checkpoints name one tensor per expert (``experts.{i}.w1.weight``).  An
:class:`ExpertSplit` says how one grouped tensor maps to its per-expert names:
:func:`~stashpoint.convert.export_hf` writes slice ``i`` under expert ``i``'s name, and
:func:`~stashpoint.convert.import_hf` stacks the experts back into one tensor, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from stashpoint.engine.hf_shards import ShardRow, Stream
from stashpoint.errors import InconsistentStateError, InvalidOptionError


@dataclass(frozen=True)
class ExpertSplit:
    """One grouped expert tensor and the HF names of its experts.

    ``grouped`` is the end of the grouped tensor's (HF-side) name, e.g. ``"moe.w1"``;
    ``per_expert`` is expert ``i``'s name relative to the same prefix, with ``{i}``, e.g.
    ``"moe.experts.{i}.w1.weight"``.  So ``layers.3.moe.w1`` of shape ``[8, d, h]``
    becomes ``layers.3.moe.experts.0.w1.weight`` ... ``layers.3.moe.experts.7.w1.weight``,
    each ``[d, h]``, or ``[h, d]`` with ``transpose=True`` (a grouped ``x @ w`` weight as
    ``nn.Linear``'s ``[out, in]``).
    """

    grouped: str
    per_expert: str
    transpose: bool = False

    def __post_init__(self) -> None:
        if self.per_expert.count("{i}") != 1 or not self.grouped:
            raise InvalidOptionError(
                f"ExpertSplit({self.grouped!r}, {self.per_expert!r}): per_expert must hold '{{i}}' "
                "once and grouped must not be empty"
            )

    def prefix_of(self, name: str) -> str | None:
        """The prefix before ``grouped`` when ``name`` is a grouped tensor's name, else None."""
        if name == self.grouped:
            return ""
        return name[: -len(self.grouped)] if name.endswith("." + self.grouped) else None

    def expert_name(self, prefix: str, i: int) -> str:
        return prefix + self.per_expert.replace("{i}", str(i))

    def match_expert(self, name: str) -> tuple[str, int] | None:
        """``(prefix, i)`` when ``name`` is expert ``i``'s tensor, else None."""
        head, tail = self.per_expert.split("{i}")
        m = re.fullmatch(f"(.*?){re.escape(head)}(0|[1-9][0-9]*){re.escape(tail)}", name)
        if m is None or (m.group(1) and not m.group(1).endswith(".")):
            return None
        return m.group(1), int(m.group(2))

    def slice_of(self, grouped: torch.Tensor, i: int) -> torch.Tensor:
        part = grouped[i]
        return part.t() if self.transpose else part

    def slice_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        inner = tuple(shape[1:])
        return (*inner[:-2], inner[-1], inner[-2]) if self.transpose else inner


def rule_for(name: str, rules: Sequence[ExpertSplit]) -> tuple[ExpertSplit, str] | None:
    """The first rule whose grouped name ends ``name``, and the prefix before it."""
    for rule in rules:
        prefix = rule.prefix_of(name)
        if prefix is not None:
            return rule, prefix
    return None


@dataclass(frozen=True)
class JoinedExperts:
    """One grouped tensor to rebuild on import: its name and its experts' names in order."""

    name: str
    rule: ExpertSplit
    experts: tuple[str, ...]


def plan_joins(names: Sequence[str], rules: Sequence[ExpertSplit], where: str) -> list[JoinedExperts]:
    """The grouped tensors that ``names`` hold as per-expert tensors; every expert from 0 up
    to the highest must be there, or InconsistentStateError names the first one missing."""
    found: dict[tuple[int, str], dict[int, str]] = {}
    for name in names:
        for r, rule in enumerate(rules):
            hit = rule.match_expert(name)
            if hit is not None:
                found.setdefault((r, hit[0]), {})[hit[1]] = name
                break
    joins = []
    for (r, prefix), experts in sorted(found.items()):
        missing = [i for i in range(max(experts) + 1) if i not in experts]
        if missing:
            raise InconsistentStateError(
                f"{where}: {rules[r].expert_name(prefix, missing[0])!r} is missing, so "
                f"{prefix + rules[r].grouped!r} cannot be joined from its experts"
            )
        ordered = tuple(experts[i] for i in range(len(experts)))
        joins.append(JoinedExperts(name=prefix + rules[r].grouped, rule=rules[r], experts=ordered))
    return joins


def stack_experts(join: JoinedExperts, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The grouped tensor, from its experts' tensors (transposed back where the rule says)."""
    parts = [fetch(name) for name in join.experts]
    if join.rule.transpose:
        parts = [p.t() for p in parts]
    return torch.stack(parts)


#: separates a grouped tensor's name from an expert index in an export row's source
_SLICE = "\0"


def split_rows(rows: Sequence[ShardRow], rules: Sequence[ExpertSplit]) -> list[ShardRow]:
    """Export rows with each grouped expert tensor replaced by one row per expert, in order."""
    out = []
    for row in rows:
        hit = rule_for(row.hf_name, rules) if len(row.shape) >= 3 else None
        if hit is None:
            out.append(row)
            continue
        rule, prefix = hit
        for i in range(row.shape[0]):
            out.append(
                ShardRow(
                    hf_name=rule.expert_name(prefix, i),
                    source=f"{row.source}{_SLICE}{i}",
                    shape=rule.slice_shape(row.shape),
                    dtype=row.dtype,
                )
            )
    return out


def sliced_stream(stream: Stream, rows: Sequence[ShardRow], rules: Sequence[ExpertSplit]) -> Stream:
    """``stream`` for the rows of :func:`split_rows`: each grouped tensor is fetched once per
    output file and its experts' slices are handed out in the order asked."""
    rule_of = {}
    for row in rows:
        hit = rule_for(row.hf_name, rules) if len(row.shape) >= 3 else None
        if hit is not None:
            rule_of[row.source] = hit[0]

    def sliced(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        wanted: dict[str, list[tuple[str, int | None]]] = {}
        for key in keys:
            base, _, i = key.partition(_SLICE)
            wanted.setdefault(base, []).append((key, int(i) if i else None))
        for base, tensor in stream(list(wanted)):
            for key, i in wanted[base]:
                yield key, tensor if i is None else rule_of[base].slice_of(tensor, i)

    return sliced
