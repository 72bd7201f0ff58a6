"""Protecting sealed memory snapshots on peer nodes, listing what a node holds, rebuilding.

The keeper of a rank (:mod:`~stashpoint.engine.keeper`) is told its
:class:`~stashpoint.planning.protection.RankProtection` by its trainer
(:class:`ProtectSetup`).  After it seals a slot it calls :meth:`Protector.protect`
on its own worker thread (never the training thread, never the job's NCCL
communicator): a replica is written to each target node, or the slot file is XOR-ed
into its stripe's parity on the holder node under the stripe's lock, and a sealed
protection record makes it count (:mod:`~stashpoint.engine.protect_store`).  The
slot stays busy until then, so the trainer never overwrites a snapshot whose
protection is still being written.  Each target keeps the newest ``keep`` protected
snapshots of a rank or stripe and drops older ones.

At recovery, :func:`inventory` lists what one node holds (its ranks' slots, the
replicas and parities it keeps for others) and :func:`rebuild` makes a lost rank's
slot file from a replica or from a parity, verified block by block against the
checksums recorded when it was protected.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from stashpoint.engine import memtier
from stashpoint.engine.checksum import parallel_block_crcs
from stashpoint.engine.net_transport import TransportSpec, make_transport
from stashpoint.engine.parity import Pacer, xor_into
from stashpoint.engine.protect_store import (
    HELD_PREFIX,
    PARITY_PREFIX,
    REBUILT_DIR,
    RECORD_SUFFIX,
    Member,
    ProtectionRecord,
    check_blocks,
    entry_name,
    entry_step,
    held_dir,
    member_from_json,
    member_to_json,
    parity_dir,
    record_from_json,
    record_to_json,
)
from stashpoint.engine.transport import NodeTransport
from stashpoint.errors import IndexCorruptError
from stashpoint.planning.protection import Holding, RankProtection, Source
from stashpoint.storage.files import open_regular
from stashpoint.vocab import HoldingKind

MEMBER_SUFFIX = ".member.json"


@dataclass(frozen=True, kw_only=True)
class ProtectSetup:
    """Trainer to keeper: protect every sealed slot so (sent again after each (re)attach);
    ``placement`` None: this job's snapshots are not protected (too few nodes)."""

    placement: RankProtection | None
    transport: TransportSpec  # how the other nodes' memory roots are reached
    keep: int
    rate: int | None
    timeout_s: float


@dataclass(frozen=True, kw_only=True)
class Protected:
    """What protecting one snapshot cost: seconds of this keeper, bytes sent, and the lag
    (seal to complete protection; for parity, None until the last member contributed)."""

    seconds: float
    bytes_sent: int
    lag_s: float | None


class Protector:
    """The keeper's side of the protection of one rank's snapshots."""

    def __init__(self, setup: ProtectSetup, transport: NodeTransport | None = None) -> None:
        self.setup = setup
        node = None if setup.placement is None else setup.placement.node
        self.transport = transport or make_transport(setup.transport, node)

    def protect(self, m: memtier.Manifest, data: memoryview, sealed_at: float) -> Protected:
        t0 = time.perf_counter()
        p = self.setup.placement
        member = Member(
            rank=m.rank,
            file_size=m.file_size,
            crc32c=tuple(parallel_block_crcs(data, m.crc_block)),
            manifest=memtier.manifest_to_json(m),
            sealed_at=sealed_at,
        )
        pacer = Pacer(self.setup.rate)
        if p.kind == "replicate":
            lag = max(self._replicate(node, m, member, data, pacer) for node in p.targets)
            sent = len(data) * len(p.targets)
        else:
            lag = self._contribute(p.targets[0], m, member, data, pacer)
            sent = len(data)
        return Protected(seconds=time.perf_counter() - t0, bytes_sent=sent, lag_s=lag)

    def _replicate(self, node: int, m: memtier.Manifest, member: Member, data, pacer: Pacer) -> float:
        t, d, entry = self.transport, held_dir(m.rank), entry_name(m.step, m.save_id)
        _drop_stale(t, node, d, m)
        t.write(node, f"{d}/{entry}.safetensors", data, pacer)
        record = ProtectionRecord(
            scheme="replica",
            step=m.step,
            save_id=m.save_id,
            world_size=m.world_size,
            crc_block=m.crc_block,
            members=(member,),
            size=len(data),
            crc32c=member.crc32c,
            protected_at=time.time(),
        )
        t.write_text(node, f"{d}/{entry}{RECORD_SUFFIX}", record_to_json(record))
        _prune(t, node, d, self.setup.keep)
        return record.lag_s

    def _contribute(self, node: int, m: memtier.Manifest, member: Member, data, pacer: Pacer) -> float | None:
        t, p = self.transport, self.setup.placement
        d, entry = parity_dir(p.stripe), entry_name(m.step, m.save_id)
        with t.lock(node, d, self.setup.timeout_s):
            _drop_stale(t, node, d, m)
            mine = f"{d}/{entry}.rank-{m.rank:05d}{MEMBER_SUFFIX}"
            names = t.listdir(node, d)
            if os.path.basename(mine) not in names:
                t.xor_into(node, f"{d}/{entry}.parity", data, pacer)
                t.write_text(node, mine, member_to_json(member))
                names = t.listdir(node, d)
            lag = None
            wanted = {f"{entry}.rank-{r:05d}{MEMBER_SUFFIX}" for r in p.members}
            if wanted <= set(names) and f"{entry}{RECORD_SUFFIX}" not in names:
                lag = self._complete(node, d, entry, m, sorted(wanted))
            _prune(t, node, d, self.setup.keep)
        return lag

    def _complete(self, node: int, d: str, entry: str, m: memtier.Manifest, member_files: list[str]) -> float:
        t = self.transport
        members = tuple(member_from_json(t.read(node, f"{d}/{n}"), f"{d}/{n}") for n in member_files)
        parity = f"{d}/{entry}.parity"
        record = ProtectionRecord(
            scheme="parity",
            step=m.step,
            save_id=m.save_id,
            world_size=m.world_size,
            crc_block=m.crc_block,
            members=members,
            size=max(x.file_size for x in members),
            crc32c=tuple(t.checksums(node, parity, m.crc_block)),
            protected_at=time.time(),
        )
        t.write_text(node, f"{d}/{entry}{RECORD_SUFFIX}", record_to_json(record))
        return record.lag_s


def _entries(t: NodeTransport, node: int, d: str) -> dict[str, list[str]]:
    """Entry name -> its files, for the entries of directory ``d``."""
    out: dict[str, list[str]] = {}
    for name in t.listdir(node, d):
        if entry_step(name) is not None:
            out.setdefault(name[:23], []).append(name)
    return out


def _drop_stale(t: NodeTransport, node: int, d: str, m: memtier.Manifest) -> None:
    """Entries of this step or later from another save (an abandoned timeline) go."""
    mine = entry_name(m.step, m.save_id)
    for entry, files in _entries(t, node, d).items():
        if entry != mine and entry_step(entry) >= m.step:
            for f in files:
                t.remove(node, f"{d}/{f}")


def _prune(t: NodeTransport, node: int, d: str, keep: int) -> None:
    """Keep the newest ``keep`` complete entries, and at most ``keep`` incomplete newer ones."""
    complete = incomplete = 0
    for entry, files in sorted(_entries(t, node, d).items(), reverse=True):
        if f"{entry}{RECORD_SUFFIX}" in files:
            complete += 1
            drop = complete > keep
        else:
            incomplete += 1
            drop = complete > 0 or incomplete > keep
        if drop:
            for f in files:
                t.remove(node, f"{d}/{f}")


# --------------------------------------------------------------------------- recovery


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
    slots), every block checked; ChecksumMismatchError names a damaged one."""
    h = source.holding
    record = _record_of(t, h)
    where = t.describe(h.node, h.path)
    check_blocks(t.checksums(h.node, h.path, record.crc_block), record.crc32c, where, record.crc_block)
    lost = next(m for m in record.members if m.rank == rank)
    if h.kind == "replica":
        return Rebuilt(rank=rank, node=h.node, path=h.path, manifest=lost.manifest)
    out = bytearray(t.read(h.node, h.path)[: lost.file_size])
    for other in source.others:
        member = next(m for m in record.members if m.rank == other.rank)
        data = t.read(other.node, other.path)[: member.file_size]
        check_blocks(
            parallel_block_crcs(memoryview(data), record.crc_block),
            member.crc32c,
            t.describe(other.node, other.path),
            record.crc_block,
        )
        n = min(len(out), len(data))
        xor_into(memoryview(out)[:n], memoryview(data)[:n])
    check_blocks(
        parallel_block_crcs(memoryview(out), record.crc_block),
        lost.crc32c,
        f"{where} (rank {rank} rebuilt from parity)",
        record.crc_block,
    )
    path = f"{REBUILT_DIR}/{entry_name(record.step, record.save_id)}-rank-{rank:05d}.safetensors"
    t.write(h.node, path, memoryview(out))
    return Rebuilt(rank=rank, node=h.node, path=path, manifest=lost.manifest)


def held_bytes(root: str) -> int:
    """Bytes of protection this node keeps for others (replicas and parities)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.startswith((HELD_PREFIX, PARITY_PREFIX)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total
