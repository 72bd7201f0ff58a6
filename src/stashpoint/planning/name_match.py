"""Matching a checkpoint's names to a target's canonical names, and the difference.

Pure: no torch, no I/O.  A load flattens its target into canonical names
(:mod:`stashpoint.planning.names`); a checkpoint written by another tool, or from a
wrapped module's ``state_dict()``, may still carry wrapper segments.
:func:`checkpoint_names` says which checkpoint names to read under which canonical
name, and :func:`diff_keys` what stays missing, unexpected or renamed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from stashpoint.planning.names import DDP_SEGMENT, strip_wrappers


def owned(name: str, prefixes: Iterable[str]) -> bool:
    """Whether ``name`` lies under one of the target's top-level names."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def ddp_roots(names: Collection[str], targets: Collection[str], prefixes: Iterable[str]) -> tuple[str, ...]:
    """The roots (``P`` or ``P.state`` for a top-level name ``P``) whose checkpoint names are a
    DDP wrapper's: every one continues with ``module.``, and no target name does."""
    roots = []
    for prefix in prefixes:
        for root in (prefix, f"{prefix}.state"):
            head = f"{root}.{DDP_SEGMENT}."
            under = [n for n in names if n.startswith(root + ".")]
            wrapped = under and all(n.startswith(head) for n in under)
            if wrapped and not any(t.startswith(head) for t in targets):
                roots.append(root)
    return tuple(roots)


def _without_ddp(name: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        head = f"{root}.{DDP_SEGMENT}."
        if name.startswith(head):
            return f"{root}.{name[len(head) :]}"
    return name


def checkpoint_names(
    names: Collection[str], targets: Collection[str], prefixes: Iterable[str]
) -> dict[str, str]:
    """``checkpoint name -> canonical name`` for the names that change.

    A name another checkpoint name already has, or that two names would both get, is
    ambiguous: those names stay as they are (and a strict load reports them).
    """
    stripped = {n: strip_wrappers(n) for n in names}
    roots = ddp_roots(set(stripped.values()), targets, list(prefixes))
    canonical = {n: _without_ddp(s, roots) for n, s in stripped.items()}
    changed = {n: c for n, c in canonical.items() if c != n}
    if not changed:
        return {}
    kept = set(names) - set(changed)
    counts = Counter(changed.values())
    return {n: c for n, c in changed.items() if counts[c] == 1 and c not in kept}


@dataclass(frozen=True)
class KeyDiff:
    """How a checkpoint's names meet a target's (see :func:`stashpoint.diff_keys`)."""

    #: target names the checkpoint does not hold: a load leaves them unwritten
    missing: tuple[str, ...]
    #: checkpoint names under the target's top-level names with no place in the target
    unexpected: tuple[str, ...]
    #: ``(checkpoint name, target name)`` pairs matched through the canonical-name rules
    renamed: tuple[tuple[str, str], ...]

    @property
    def complete(self) -> bool:
        """Every target is written and every checkpoint name has a place."""
        return not self.missing and not self.unexpected

    def summary(self, limit: int = 5) -> str:
        """A few lines for people: counts, and the first ``limit`` names of each kind."""
        lines = []
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            if names:
                more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
                lines.append(f"{len(names)} {label}: {', '.join(names[:limit])}{more}")
        if self.renamed:
            shown = ", ".join(f"{a} -> {b}" for a, b in self.renamed[:limit])
            more = f" (+{len(self.renamed) - limit} more)" if len(self.renamed) > limit else ""
            lines.append(f"{len(self.renamed)} renamed: {shown}{more}")
        return "\n".join(lines) if lines else "names match"


def diff_keys(
    names: Collection[str], targets: Collection[str], prefixes: Iterable[str], renamed: Mapping[str, str]
) -> KeyDiff:
    """The difference between checkpoint ``names`` (after ``renamed``) and ``targets``."""
    prefixes = list(prefixes)
    loaded = {renamed.get(n, n) for n in names}
    return KeyDiff(
        missing=tuple(sorted(t for t in targets if t not in loaded)),
        unexpected=tuple(sorted(n for n in loaded if owned(n, prefixes) and n not in targets)),
        renamed=tuple(sorted((a, b) for a, b in renamed.items() if b in targets)),
    )
