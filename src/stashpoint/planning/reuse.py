"""When a save plan made earlier still holds, decided from one fixed-size comparison.

A plan is a function of every rank's inventory (:func:`~stashpoint.planning.save_plan.
build_save_plan`).  Between two saves of an unchanged layout the inventories differ
only in content: the digests of "checked" leaves and the sizes of encoded values.
Sizes only balance who writes a stored-once value, so a reused plan keeps its
writers.  Digests decide, for a leaf every rank holds as "checked", whether it is
stored once (identical everywhere) or per rank, so they are compared again at every
save:

* ``same``: leaves the plan stores once must still be identical on every rank (one
  word: a hash of their digests, in plan order);
* ``differ``: leaves the plan stores per rank because they differed must each still
  differ somewhere (one word each, the digest itself; at most :data:`MAX_DIFFERING`).

Replicated tensors every rank holds join ``same``: two ranks holding different bytes
under one name is a collision the full planning reports (``NameCollisionError``), so a
changed word makes every rank plan again and meet it.  Replicated tensors held by some
ranks only (a pipeline stage's, replicated over its data-parallel ranks) cannot be
compared in a fixed number of words: such a state is planned in full at every save.

The first word is the plan's generation: a number agreed with the plan, proposed by a
rank only when its own layout is unchanged (0 otherwise), so one changed rank makes
every rank plan again.  :data:`BALLOT_WIDTH` words in all, whatever the state's size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stashpoint.planning.save_plan import CHECKED, GLOBAL, REPLICATED, LocalItem, SavePlan

#: per-rank "checked" leaves a reusable plan may hold (mark per-rank values PerRank)
MAX_DIFFERING = 16
#: words in the comparison: generation, hash of the stored-once digests, differing digests
BALLOT_WIDTH = 2 + MAX_DIFFERING
#: the largest word (words travel as int64)
WORD_MASK = 2**63 - 1


@dataclass(frozen=True)
class ContentChecks:
    """The leaves whose content decided how the plan stores them."""

    same: tuple[str, ...]  # stored once: identical on every rank when planned
    differ: tuple[str, ...]  # stored per rank: differed between ranks when planned
    partial_replicas: bool = False  # replicated tensors held by some ranks only

    @property
    def reusable(self) -> bool:
        return len(self.differ) <= MAX_DIFFERING and not self.partial_replicas


def content_checks(inventories: list[list[LocalItem]], plan: SavePlan) -> ContentChecks:
    """The leaves whose content decided their storage or is checked for collisions."""
    world = len(inventories)
    held: dict[str, list[LocalItem]] = {}
    for items in inventories:
        for it in items:
            held.setdefault(it.fqn, []).append(it)
    compared = sorted(
        f for f, its in held.items() if len(its) == world and all(i.scope == CHECKED for i in its)
    )
    replicas = {f: its for f, its in held.items() if _digested_replica(its)}
    same = [f for f in compared if plan.items[f].scope == GLOBAL]
    same += sorted(f for f, its in replicas.items() if len(its) == world)
    return ContentChecks(
        same=tuple(same),
        differ=tuple(f for f in compared if plan.items[f].scope != GLOBAL),
        partial_replicas=any(1 < len(its) < world for its in replicas.values()),
    )


def _digested_replica(its: list[LocalItem]) -> bool:
    return all(i.scope == REPLICATED and i.is_tensor and i.digest is not None for i in its)


def digest_word(digest: tuple[str, int] | None) -> int:
    """One word for an inventory digest (``(algorithm, value)``); 0 for none."""
    if digest is None:
        return 0
    h = hashlib.blake2b(digest[0].encode(), digest_size=8)
    h.update(digest[1].to_bytes((digest[1].bit_length() + 8) // 8, "little", signed=False))
    return int.from_bytes(h.digest(), "little") & WORD_MASK


def fold(digests: list[int]) -> int:
    """One word for a list of digests (equal lists give equal words; different ones
    collide with probability 2**-63)."""
    h = hashlib.blake2b(digest_size=8)
    for d in digests:
        h.update(d.to_bytes(8, "little", signed=False))
    return int.from_bytes(h.digest(), "little") & WORD_MASK


def ballot(generation: int, checks: ContentChecks, digests: dict[str, int]) -> tuple[int, ...]:
    """This rank's words; ``generation`` is 0 when its layout changed or it has no plan."""
    if not checks.reusable:
        generation = 0
    differing = [digests.get(f, 0) for f in checks.differ[:MAX_DIFFERING]]
    padding = [0] * (MAX_DIFFERING - len(differing))
    same = fold([digests.get(f, 0) for f in checks.same])
    return (generation, same, *differing, *padding)


def still_valid(generation: int, checks: ContentChecks, same: tuple[bool, ...]) -> bool:
    """From the comparison of every rank's :func:`ballot`: reuse the plan or plan again."""
    if generation == 0 or not checks.reusable or len(same) != BALLOT_WIDTH:
        return False
    return same[0] and same[1] and not any(same[2 : 2 + len(checks.differ)])


def new_generation(token: str) -> int:
    """A plan's generation from the save that made it (never 0)."""
    return (
        int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") & WORD_MASK
    ) or 1
