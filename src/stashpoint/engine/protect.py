"""Protecting sealed memory snapshots on peer nodes.

The keeper of a rank (:mod:`~stashpoint.engine.keeper`) is told its
:class:`~stashpoint.planning.protection.RankProtection` by its trainer
(:class:`ProtectSetup`).  After it seals a slot it calls :meth:`Protector.protect`
on its own worker thread (never the training thread, never the job's NCCL
communicator): a replica is written to each target node, or the slot file is XOR-ed
into its stripe's parity on the holder node (alongside the other members, piece by
piece), and a sealed protection record makes it count (:mod:`~stashpoint.engine.protect_store`).  The
slot stays busy until then, so the trainer never overwrites a snapshot whose
protection is still being written.  Each target keeps the newest ``keep`` protected
snapshots of a rank or stripe and drops older ones.

What is done with the protection after a node loss is in :mod:`~stashpoint.engine.rebuild`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from stashpoint.engine import memtier
from stashpoint.engine.checksum import parallel_block_crcs
from stashpoint.engine.net_transport import TransportSpec, make_transport
from stashpoint.engine.parity import Pacer
from stashpoint.engine.protect_store import (
    RECORD_SUFFIX,
    Member,
    ProtectionRecord,
    entry_name,
    entry_step,
    held_dir,
    member_from_json,
    member_to_json,
    parity_dir,
    record_to_json,
)
from stashpoint.engine.transport import NodeTransport
from stashpoint.planning.protection import RankProtection

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
        # unpaced, a transport may spread the bytes over the pool's threads
        pacer = None if self.setup.rate is None else Pacer(self.setup.rate)
        if p.kind == "replicate":
            lag = max(self._replicate(node, m, member, data, pacer) for node in p.targets)
            sent = len(data) * len(p.targets)
        else:
            lag = self._contribute(p.targets[0], m, member, data, pacer)
            sent = len(data)
        return Protected(seconds=time.perf_counter() - t0, bytes_sent=sent, lag_s=lag)

    def _replicate(self, node: int, m: memtier.Manifest, member: Member, data, pacer: Pacer | None) -> float:
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

    def _contribute(
        self, node: int, m: memtier.Manifest, member: Member, data, pacer: Pacer | None
    ) -> float | None:
        """XOR the slot into its stripe's parity, then record the contribution.

        The stripe's lock is held only to look and to record: the XOR itself runs while
        the other members XOR theirs (each piece under its own lock, see
        :class:`~stashpoint.engine.transport.XorFile`).  Whoever records the last
        contribution completes the parity.
        """
        t, p = self.transport, self.setup.placement
        d, entry = parity_dir(p.stripe), entry_name(m.step, m.save_id)
        mine = f"{d}/{entry}.rank-{m.rank:05d}{MEMBER_SUFFIX}"
        with t.lock(node, d, self.setup.timeout_s):
            _drop_stale(t, node, d, m)
            done = os.path.basename(mine) in t.listdir(node, d)
        if not done:
            t.xor_into(node, f"{d}/{entry}.parity", data, pacer)
        with t.lock(node, d, self.setup.timeout_s):
            if not done:
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
