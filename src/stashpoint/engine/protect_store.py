"""Where protection lives in a node's memory root, how it is proven, and how it is reached.

A node's memory root (:mod:`~stashpoint.engine.memtier`) also holds what the node keeps
for other nodes::

    stashpoint-mem-<key>/
      held-rank-00003/               replicas of rank 3's snapshots (rank 3 is elsewhere)
        s000000012-<id>.safetensors    a copy of rank 3's slot file of step 12
        s000000012-<id>.protect.json   its protection record: present only once complete
      parity-g00000-s00001/          the parity of stripe 1 of node group 0
        s000000012-<id>.parity         XOR of the stripe's slot files of step 12
        s000000012-<id>.rank-00002.member.json   one per member, as each contributes
        s000000012-<id>.protect.json   present only once every member contributed
        .lock                          taken (flock) while a member looks or records
      rebuilt/                       lost ranks' slot files rebuilt from parity (recovery)

``<id>`` is a hash of the snapshot's save id.  A protection record is sealed with the
SHA-256 of its bytes (as manifests are) and lists, per member, the member's own sealed
slot manifest, the crc32c of every block of its whole slot file (header included) and
when it was sealed; and the crc32c of every block of the stored file (replica or
parity) and when the protection completed: ``protected_at - sealed_at`` is the
protection lag.  Nothing without a record is protection.

Every file is reached through a :class:`~stashpoint.engine.transport.NodeTransport`:
the file system, or TCP to the other nodes' keepers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from stashpoint.errors import ChecksumMismatchError, IndexCorruptError
from stashpoint.format.index_json import check_seal, parse_strict, seal
from stashpoint.vocab import HoldingKind

RECORD_KIND = "stashpoint-snapshot-protection"
RECORD_VERSION = 1
HELD_PREFIX = "held-rank-"
PARITY_PREFIX = "parity-"
REBUILT_DIR = "rebuilt"
RECORD_SUFFIX = ".protect.json"


def entry_name(step: int, save_id: str) -> str:
    return f"s{step:09d}-{hashlib.sha256(save_id.encode()).hexdigest()[:12]}"


def entry_step(name: str) -> int | None:
    """The step of an entry's file name (None: not an entry)."""
    head = name[1:10]
    return int(head) if name.startswith("s") and head.isdigit() and name[10:11] == "-" else None


def held_dir(rank: int) -> str:
    return f"{HELD_PREFIX}{rank:05d}"


def parity_dir(stripe: str) -> str:
    return f"{PARITY_PREFIX}{stripe}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class Member:
    """One rank's slot file as it was protected."""

    rank: int
    file_size: int
    crc32c: tuple[int, ...]  # every block of the whole slot file
    manifest: str  # the rank's sealed slot manifest
    sealed_at: float  # unix time


@dataclass(frozen=True, kw_only=True)
class ProtectionRecord:
    """A complete replica or parity (see the module docstring)."""

    scheme: HoldingKind  # "replica" or "parity"
    step: int
    save_id: str
    world_size: int
    crc_block: int
    members: tuple[Member, ...]
    size: int  # of the stored file
    crc32c: tuple[int, ...]  # of the stored file
    protected_at: float

    @property
    def lag_s(self) -> float:
        """From the last member's seal to the protection being complete."""
        return self.protected_at - max(m.sealed_at for m in self.members)


def member_to_json(m: Member) -> str:
    doc = {
        "rank": m.rank,
        "file_size": m.file_size,
        "crc32c": list(m.crc32c),
        "manifest": m.manifest,
        "sealed_at": m.sealed_at,
    }
    return seal(json.dumps(doc, indent=1))


def _member(doc: dict) -> Member:
    return Member(
        rank=int(doc["rank"]),
        file_size=int(doc["file_size"]),
        crc32c=tuple(int(c) for c in doc["crc32c"]),
        manifest=str(doc["manifest"]),
        sealed_at=float(doc["sealed_at"]),
    )


def _sealed_doc(raw: bytes, where: str) -> dict:
    if not check_seal(raw, where):
        raise IndexCorruptError(f"{where}: the protection record has no checksum")
    doc = parse_strict(raw, where)
    if not isinstance(doc, dict):
        raise IndexCorruptError(f"{where}: not a protection record")
    return doc


def member_from_json(raw: bytes, where: str) -> Member:
    try:
        return _member(_sealed_doc(raw, where))
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{where}: malformed member record ({type(exc).__name__}: {exc})") from None


def record_to_json(r: ProtectionRecord) -> str:
    doc = {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "scheme": r.scheme,
        "step": r.step,
        "save_id": r.save_id,
        "world_size": r.world_size,
        "crc_block": r.crc_block,
        "members": [json.loads(member_to_json(m)) for m in r.members],
        "size": r.size,
        "crc32c": list(r.crc32c),
        "protected_at": r.protected_at,
        "lag_s": r.lag_s,
    }
    return seal(json.dumps(doc, indent=1))


def record_from_json(raw: bytes, where: str) -> ProtectionRecord:
    """A record whose seal matches; IndexCorruptError names what is wrong otherwise."""
    doc = _sealed_doc(raw, where)
    try:
        if doc["kind"] != RECORD_KIND or doc["version"] != RECORD_VERSION:
            raise IndexCorruptError(f"{where}: not a protection record of version {RECORD_VERSION}")
        return ProtectionRecord(
            scheme=doc["scheme"],
            step=int(doc["step"]),
            save_id=str(doc["save_id"]),
            world_size=int(doc["world_size"]),
            crc_block=int(doc["crc_block"]),
            members=tuple(_member(m) for m in doc["members"]),
            size=int(doc["size"]),
            crc32c=tuple(int(c) for c in doc["crc32c"]),
            protected_at=float(doc["protected_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(
            f"{where}: malformed protection record ({type(exc).__name__}: {exc})"
        ) from None


def check_blocks(
    got: list[int] | tuple[int, ...], want: tuple[int, ...], where: str, block: int, first: int | None = None
) -> None:
    """ChecksumMismatchError naming the first damaged block, if any.  ``got`` are the
    checksums of every block of a file, or (``first`` given) of the blocks from ``first`` on."""
    expected = tuple(want) if first is None else tuple(want[first : first + len(got)])
    first = first or 0
    if tuple(got) == expected:
        return
    bad = first + next(
        (i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
    )
    raise ChecksumMismatchError(
        f"{where}: block {bad} (bytes {bad * block}..{(bad + 1) * block}) does not match its "
        "protection checksum (damaged in memory)"
    )
