"""The keeper: a rank's writer process that also holds its memory snapshots, and outlives it.

Started by the trainer (``python -m stashpoint.engine.keeper_main ROOT RANK ...``, a new
session, so signals to the trainer's process group spare it), the keeper listens on
a Unix socket in the rank's directory of the memory tier
(:mod:`~stashpoint.engine.memtier`) and serves one trainer at a time:

1. ``SlotAlloc``: creates a snapshot slot in shared memory (or keeps the one of that
   size a previous keeper of this rank left: a restarted keeper adopts its slots);
2. ``Seal``: once the trainer has copied a snapshot into a slot, computes the crc32c
   of every block (in a thread pool, off the training thread) and writes the
   manifest that makes the snapshot exist;
3. ``PersistSnapshot``: writes a slot's snapshot as a durable checkpoint, each block
   checked against the snapshot's checksums on the way (memory is not trusted
   blindly); rank 0's keeper commits, as for an async save;
4. ordinary async-save jobs, as any writer.

When its trainer goes away without ``Release`` (a crash, a SIGKILL, an exit that is
not the end of training), the keeper keeps the snapshots and waits up to
``reattach_s`` for a restarted trainer.  If none comes, or on SIGTERM, or when a
preemption deadline passes with nothing asked, it *persists at the breakpoint*: the
newest snapshot complete for every rank is written to the durable root as an
ordinary committed checkpoint (unless that step is already there).  Then it frees
the rank's shared memory and exits.  ``Release`` frees at once.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stashpoint.engine import memtier
from stashpoint.engine.checksum import CRC_THREADS, block_crcs
from stashpoint.engine.messages import (
    NODE_SERVER_TAG,
    Allocated,
    AllocFailed,
    Committed,
    ErrorReport,
    Failed,
    Outcome,
    Persisted,
    PersistSnapshot,
    Preempted,
    Release,
    Seal,
    ServeNode,
    SlotAlloc,
    apply_env,
)
from stashpoint.engine.node_server import NodeServer
from stashpoint.engine.persist import data_file_name
from stashpoint.engine.protect import Protector, ProtectSetup
from stashpoint.engine.publish import Publisher
from stashpoint.engine.records import Chunk, FileItem, Written
from stashpoint.engine.staging import SharedBuffer
from stashpoint.engine.writer import Share, publish_share
from stashpoint.errors import ChecksumMismatchError, StashpointError
from stashpoint.format.index import INDEX_FILE, ChunkRecord, Index
from stashpoint.storage import resolve

#: threads computing checksums of a sealed snapshot
#: a keeper started by a trainer waits this long for it to connect
FIRST_CONNECT_S = 120.0


@dataclass(frozen=True, kw_only=True)
class KeeperConfig:
    root: str  # the job's memory tier on this node
    rank: int
    durable: str | None  # where to persist at the breakpoint (None: never)
    reattach_s: float
    timeout_s: float
    checkpoint_name: str = "step-{step:09d}"


@dataclass(frozen=True)
class _Breakpoint:
    """Queued when the keeper must persist the newest snapshot on its own."""

    reason: str


class Keeper:
    """The memory-tier part of a rank's writer (see the module docstring)."""

    def __init__(self, writer_cls: type, config: KeeperConfig) -> None:
        self.config = config
        self.slots: dict[int, SharedBuffer] = {}
        self.preempt_timer: threading.Timer | None = None
        self.persisted_steps: set[int] = set()
        self.protector: Protector | None = None  # set by the trainer's ProtectSetup
        self.node_server: NodeServer | None = None  # started by the trainer's ServeNode
        #: durable copies run on their own thread: a seal never waits behind a persist
        self.persists: queue.Queue = queue.Queue()
        self.persister = threading.Thread(target=self._persist_loop, name="stashpoint-persist", daemon=True)
        self.persister.start()
        keeper = self

        class _Serving(writer_cls):
            def handle_other(self, msg: object) -> bool:
                return keeper.handle(self, msg)

            def run_other(self, item: object) -> None:
                keeper.run(self, item)

        self.writer = _Serving()

    # -- reading thread ------------------------------------------------------------------

    def handle(self, writer, msg: object) -> bool:
        if isinstance(msg, SlotAlloc):
            self._slot(writer, msg)
        elif isinstance(msg, (Seal, PersistSnapshot)):
            writer.jobs.put(msg)
        elif isinstance(msg, Preempted):
            self._arm(msg.deadline_unix)
        elif isinstance(msg, ProtectSetup):
            if self.protector is not None:
                self.protector.transport.close()
            self.protector = None if msg.placement is None else Protector(msg)
        elif isinstance(msg, ServeNode):
            self._serve_node(writer, msg)
        elif isinstance(msg, Release):
            return True
        return False

    def _slot(self, writer, msg: SlotAlloc) -> None:
        root, rank = self.config.root, self.config.rank
        path = memtier.slot_data(root, rank, msg.slot)
        try:
            old = self.slots.pop(msg.slot, None)
            if old is not None and old.size == msg.size:
                self.slots[msg.slot] = old
            else:
                memtier.drop_manifest(root, rank, msg.slot)
                if old is not None:
                    old.close(unlink=True)
                adopt = os.path.exists(path) and os.stat(path).st_size == msg.size
                if not adopt and os.path.exists(path):
                    os.unlink(path)
                self.slots[msg.slot] = SharedBuffer(path, msg.size, create=not adopt)
        except Exception as exc:
            writer.send(AllocFailed(tag=f"slot-{msg.slot}", error=ErrorReport.of(exc)))
            return
        writer.send(Allocated(tag=f"slot-{msg.slot}", path=path))

    def _serve_node(self, writer, msg: ServeNode) -> None:
        """Serve the node's memory root to the other nodes (one server, kept across trainers)."""
        try:
            if self.node_server is not None and (self.node_server.host, self.node_server.token) != (
                msg.host,
                msg.token,
            ):
                self.node_server.close()
                self.node_server = None
            if self.node_server is None:
                self.node_server = NodeServer(self.config.root, msg.token, msg.host, self.config.timeout_s)
        except Exception as exc:
            writer.send(AllocFailed(tag=NODE_SERVER_TAG, error=ErrorReport.of(exc)))
            return
        writer.send(Allocated(tag=NODE_SERVER_TAG, path=self.node_server.address))

    def _arm(self, deadline_unix: float) -> None:
        if self.preempt_timer is not None:
            self.preempt_timer.cancel()
        delay = max(0.0, deadline_unix - time.time())
        self.preempt_timer = threading.Timer(
            delay, lambda: self.writer.jobs.put(_Breakpoint("the preemption grace period ran out"))
        )
        self.preempt_timer.daemon = True
        self.preempt_timer.start()

    # -- worker thread -------------------------------------------------------------------

    def run(self, writer, item: object) -> None:
        if isinstance(item, _Breakpoint):
            self.persist_breakpoint(item.reason)
            return
        if isinstance(item, PersistSnapshot):
            self.persists.put((writer, item))
            return
        self._answer(writer, item, self._seal)

    def _answer(self, writer, item: Seal | PersistSnapshot, fn) -> None:
        try:
            outcome = fn(item)
        except BaseException as exc:
            writer.send(Failed(job_id=item.job_id, error=ErrorReport.of(exc)))
            return
        writer.send(Committed(job_id=item.job_id, outcome=outcome))

    def _persist_loop(self) -> None:
        while True:
            got = self.persists.get()
            if got is None:
                return
            writer, item = got
            self._answer(writer, item, functools.partial(self._persist, writer))

    def drain(self) -> None:
        """Finish the durable copies already asked for."""
        self.persists.put(None)
        self.persister.join()

    def _seal(self, msg: Seal) -> Outcome:
        t0 = time.perf_counter()
        buf = self._buffer(msg.slot)
        views = [buf.view(a, b - a) for a, b in msg.ranges]
        with ThreadPoolExecutor(CRC_THREADS) as pool:
            crcs = list(pool.map(lambda v: block_crcs(v, msg.crc_block) if len(v) else [0], views))
        records = tuple(_written(c, rng, crc, msg.rank) for c, rng, crc in zip(msg.chunks, msg.ranges, crcs))
        manifest = memtier.Manifest(
            rank=msg.rank,
            slot=msg.slot,
            step=msg.step,
            save_id=msg.save_id,
            world_size=msg.world_size,
            crc_block=msg.crc_block,
            file_size=msg.file_size,
            records=(*records, *msg.inline),
            plan=msg.plan_items,
            metadata=msg.metadata,
        )
        memtier.write_manifest(self.config.root, manifest)
        phases = {"checksum": time.perf_counter() - t0}
        if self.protector is not None:  # the slot stays busy until its protection is written
            phases.update(self._protect(manifest, buf.view(0, msg.file_size)))
        return Outcome(bytes_written=msg.file_size, total_bytes=None, phase_seconds=phases)

    def _protect(self, manifest: memtier.Manifest, data: memoryview) -> dict[str, float]:
        """Protect a sealed snapshot on peer nodes; a failure leaves it unprotected, not lost."""
        try:
            got = self.protector.protect(manifest, data, time.time())
        except (StashpointError, OSError) as exc:
            print(
                f"stashpoint keeper rank {self.config.rank}: the snapshot of step {manifest.step} "
                f"is not protected: {exc}",
                file=sys.stderr,
            )
            return {}
        lag = {} if got.lag_s is None else {"protect_lag": got.lag_s}
        return {"protect": got.seconds, **lag}

    def _buffer(self, slot: int) -> SharedBuffer:
        buf = self.slots.get(slot)
        if buf is None:  # a slot a previous keeper of this rank left: adopt it
            path = memtier.slot_data(self.config.root, self.config.rank, slot)
            buf = SharedBuffer(path, os.stat(path).st_size, create=False)
            self.slots[slot] = buf
        return buf

    def _persist(self, writer, msg: PersistSnapshot) -> Outcome:
        apply_env(msg.env)
        manifest = self._manifest(msg.slot)
        return self.persist_manifest(
            manifest,
            msg.path,
            msg.timeout_s,
            lambda n: writer.send(Persisted(job_id=msg.job_id, bytes_written=n)),
        )

    def _manifest(self, slot: int) -> memtier.Manifest:
        for m in memtier.read_manifests(self.config.root, self.config.rank):
            if m.slot == slot:
                return m
        raise ChecksumMismatchError(
            f"{memtier.slot_data(self.config.root, self.config.rank, slot)}: "
            "the slot holds no complete snapshot"
        )

    def persist_manifest(self, m: memtier.Manifest, path: str, timeout_s: float, persisted=None) -> Outcome:
        """Write the snapshot ``m`` (this rank's part) to ``path``; rank 0 commits."""
        storage, final = resolve(path)
        if _committed_as(storage, final, m.save_id):
            return Outcome(bytes_written=0, total_bytes=None, phase_seconds={})
        publisher = Publisher(storage, final, token=m.save_id, overwrite=False)
        if m.rank == 0:
            publisher.prepare()
        buf = self._buffer(m.slot)
        written = [c for c in m.records if isinstance(c, Written)]
        items = [
            FileItem(chunk=_chunk_of(w), fetch=lambda w=w: buf.view(w.record.byte_range[0], w.record.nbytes))
            for w in written
        ]
        share = Share(
            rank=m.rank,
            world_size=m.world_size,
            items=items,
            inline=tuple(c for c in m.records if not isinstance(c, Written)),
            crc_block=m.crc_block,
            timeout_s=timeout_s,
            plan_items=m.plan,
            metadata=m.metadata,
            check=lambda got: _same_checksums(written, got, path),
        )
        outcome = publish_share(publisher, share, persisted or (lambda n: None))
        self.persisted_steps.add(m.step)
        return outcome

    def persist_breakpoint(self, reason: str) -> None:
        """Persist the newest snapshot complete for every rank, unless it is already durable."""
        cfg = self.config
        if cfg.durable is None:
            return
        snaps = memtier.complete_snapshots(cfg.root)
        if not snaps:
            print(
                f"stashpoint keeper rank {cfg.rank}: {reason}; no complete snapshot to persist",
                file=sys.stderr,
            )
            return
        snap = snaps[0]
        if snap.step in self.persisted_steps or cfg.rank >= snap.world_size:
            return  # done already, or this rank is not part of that snapshot's world
        mine = snap.manifests[cfg.rank]
        storage, root = resolve(cfg.durable)
        path = storage.url(storage.join(root, cfg.checkpoint_name.format(step=snap.step)))
        try:
            self.persist_manifest(mine, path, cfg.timeout_s)
        except (StashpointError, OSError) as exc:
            print(
                f"stashpoint keeper rank {cfg.rank}: persisting step {snap.step} failed: {exc}",
                file=sys.stderr,
            )
            return
        print(
            f"stashpoint keeper rank {cfg.rank}: {reason}; persisted the memory snapshot of step "
            f"{snap.step} to {path}",
            file=sys.stderr,
        )

    def close(self) -> None:
        if self.preempt_timer is not None:
            self.preempt_timer.cancel()
        if self.node_server is not None:
            self.node_server.close()
        for buf in self.slots.values():
            buf.close()
        self.slots.clear()


def _written(chunk: Chunk, rng: tuple[int, int], crcs: list[int], rank: int) -> Written:
    record = ChunkRecord(
        offsets=chunk.offsets,
        shape=tuple(chunk.shape),
        file=data_file_name(rank),
        key=chunk.key,
        byte_range=rng,
        crc32c=tuple(crcs),
    )
    return Written(fqn=chunk.fqn, per_rank=chunk.per_rank, dtype=chunk.dtype, record=record)


def _chunk_of(w: Written) -> Chunk:
    return Chunk(
        fqn=w.fqn,
        per_rank=w.per_rank,
        key=w.record.key,
        dtype=w.dtype,
        shape=w.record.shape,
        offsets=w.record.offsets,
        nbytes=w.record.nbytes,
    )


def _same_checksums(snapshot: list[Written], persisted: list[Written], where: str) -> None:
    """The bytes written match the snapshot's checksums: memory was not damaged since the seal."""
    for a, b in zip(snapshot, persisted, strict=True):
        if a.record.crc32c != b.record.crc32c:
            raise ChecksumMismatchError(
                f"{where}: {a.fqn!r}: the memory snapshot no longer matches its checksums "
                "(host memory was damaged after the snapshot); not persisted"
            )


def _committed_as(storage, final: str, save_id: str) -> bool:
    try:
        raw = storage.read_bytes(storage.join(final, INDEX_FILE))
    except Exception:  # not there (or unreadable): not committed by this snapshot
        return False
    try:
        return Index.from_json(raw, storage.describe(final)).metadata.save_id == save_id
    except StashpointError:
        return False
