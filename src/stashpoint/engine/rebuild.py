"""After a node loss: what each node holds, and a lost rank's slot file rebuilt and verified.

:func:`inventory` lists what one node holds (its ranks' slots, the replicas and parities
it keeps for others, each with a sealed protection record).  :func:`rebuild` makes a lost
rank's slot file usable: a replica is used where it lies once every block matches its
record; from a parity, the lost file is computed piece by piece on the pool's threads
(the parity's piece XOR the other members' pieces), every piece of every input and of
the result checked against the checksums recorded when it was protected, and written
into ``rebuilt/`` on the parity's node.  Memory stays a few pieces per thread; nothing is
read whole.  A damaged input is a :class:`~stashpoint.errors.ChecksumMismatchError`
naming the file and the block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stashpoint.engine import memtier
from stashpoint.engine.checksum import block_crcs
from stashpoint.engine.parity import PIECE_BYTES, Pacer, xor_into
from stashpoint.engine.protect_store import (
    HELD_PREFIX,
    PARITY_PREFIX,
    REBUILT_DIR,
    RECORD_SUFFIX,
    Member,
    ProtectionRecord,
    check_blocks,
    entry_name,
    record_from_json,
)
from stashpoint.engine.transport import NodeTransport, PartFile, in_pieces
from stashpoint.errors import ChecksumMismatchError, IndexCorruptError
from stashpoint.planning.protection import Holding, Source
from stashpoint.storage.files import open_regular
from stashpoint.vocab import HoldingKind


def _records(root: str, d: str) -> list[tuple[str, ProtectionRecord]]:
    out = []
    for name in sorted(os.listdir(os.path.join(root, d))):
        if not name.endswith(RECORD_SUFFIX):
            continue
        path = os.path.join(root, d, name)
        try:
            with os.fdopen(open_regular(path), "rb") as f:  # never a FIFO in place of a record
                out.append((name[: -len(RECORD_SUFFIX)], record_from_json(f.read(), path)))
        except (OSError, IndexCorruptError):
            continue  # a damaged record protects nothing
    return out


def _held(kind: HoldingKind, node: int, r: ProtectionRecord, path: str) -> Holding:
    """A replica (of its one member) or a parity (over its members) as a holding."""
    return Holding(
        kind=kind,
        node=node,
        step=r.step,
        save_id=r.save_id,
        world_size=r.world_size,
        rank=r.members[0].rank if kind == "replica" else -1,
        path=path,
        members=() if kind == "replica" else tuple(m.rank for m in r.members),
    )


def inventory(root: str, node: int) -> list[Holding]:
    """What the node whose memory root is ``root`` holds: slots, replicas, parities."""
    out: list[Holding] = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        if name.startswith("rank-") and name[5:].isdigit():
            rank = int(name[5:])
            for m in memtier.read_manifests(root, rank):
                path = os.path.relpath(memtier.slot_data(root, rank, m.slot), root)
                out.append(
                    Holding(
                        kind="slot",
                        node=node,
                        step=m.step,
                        save_id=m.save_id,
                        world_size=m.world_size,
                        rank=rank,
                        path=path,
                    )
                )
        elif name.startswith(HELD_PREFIX):
            out += [
                _held("replica", node, r, f"{name}/{entry}.safetensors") for entry, r in _records(root, name)
            ]
        elif name.startswith(PARITY_PREFIX):
            out += [_held("parity", node, r, f"{name}/{entry}.parity") for entry, r in _records(root, name)]
    return out


@dataclass(frozen=True, kw_only=True)
class Rebuilt:
    """A lost rank's slot file, verified: on ``node`` at ``path``, with its slot manifest."""

    rank: int
    node: int
    path: str
    manifest: str


def _record_of(t: NodeTransport, h: Holding) -> ProtectionRecord:
    where = t.describe(h.node, h.path)
    base = h.path.rsplit(".", 1)[0]
    return record_from_json(t.read(h.node, f"{base}{RECORD_SUFFIX}"), f"{where} (record)")


def rebuild(t: NodeTransport, source: Source, rank: int) -> Rebuilt:
    """``rank``'s slot file from ``source`` (a replica, or a parity and the other members'
    slots), every block checked; ChecksumMismatchError names a damaged one.  A parity is
    rebuilt on its own node, which must be this process's (see the module docstring)."""
    h = source.holding
    record = _record_of(t, h)
    lost = next(m for m in record.members if m.rank == rank)
    if h.kind == "replica":
        where = t.describe(h.node, h.path)
        check_blocks(t.checksums(h.node, h.path, record.crc_block), record.crc32c, where, record.crc_block)
        return Rebuilt(rank=rank, node=h.node, path=h.path, manifest=lost.manifest)
    path = f"{REBUILT_DIR}/{entry_name(record.step, record.save_id)}-rank-{rank:05d}.safetensors"
    inputs = [_Input(node=h.node, path=h.path, size=record.size, crcs=record.crc32c)]
    for other in source.others:
        member = next(m for m in record.members if m.rank == other.rank)
        inputs.append(_Input(node=other.node, path=other.path, size=member.file_size, crcs=member.crc32c))
    part = PartFile(t.local_file(h.node, path))
    try:
        _xor_inputs(
            t, inputs, lost, record.crc_block, part, f"{t.describe(h.node, h.path)} (rank {rank} rebuilt)"
        )
        part.commit()
    finally:
        part.abort()
    return Rebuilt(rank=rank, node=h.node, path=path, manifest=lost.manifest)


@dataclass(frozen=True, kw_only=True)
class _Input:
    """A file a lost slot is computed from, with its length and recorded block checksums."""

    node: int
    path: str
    size: int
    crcs: tuple[int, ...]


def _checked(t: NodeTransport, src: _Input, a: int, n: int, block: int, buf: bytearray) -> memoryview:
    """Bytes ``[a, a + n)`` of ``src`` (fewer past its end), their blocks checked."""
    n = max(0, min(n, src.size - a))
    view = memoryview(buf)[:n]
    where = t.describe(src.node, src.path)
    if n and t.read_into(src.node, src.path, a, view) != n:
        raise ChecksumMismatchError(f"{where}: shorter than its {src.size} bytes")
    if n:
        check_blocks(block_crcs(view, block), src.crcs, where, block, first=a // block)
    return view


def _xor_inputs(
    t: NodeTransport, inputs: list[_Input], lost: Member, block: int, part: PartFile, where: str
) -> None:
    """``lost``'s file = XOR of ``inputs``, piece by piece on the pool's threads, checked, into ``part``."""
    step = block * max(1, PIECE_BYTES // block)

    def piece(a: int, b: int) -> None:
        whole = -(-(b - a) // block) * block  # inputs are checked by whole blocks
        out = _checked(t, inputs[0], a, whole, block, bytearray(whole))
        for src in inputs[1:]:
            other = _checked(t, src, a, whole, block, bytearray(whole))
            xor_into(out[: len(other)], other, Pacer(None))  # on a pool thread: never spread again
        result = out[: b - a]
        check_blocks(block_crcs(result, block), lost.crc32c, where, block, first=a // block)
        part.write_at(a, result)

    in_pieces(lost.file_size, piece, parallel=True, step=step)


def held_bytes(root: str) -> int:
    """Bytes of protection this node keeps for others (replicas and parities)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.startswith((HELD_PREFIX, PARITY_PREFIX)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total
