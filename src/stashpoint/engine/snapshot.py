"""Memory snapshots, the trainer's side: copy the state into a slot its keeper owns.

Call order (every rank calls :meth:`MemorySnapshots.snapshot` with the same step):

1. the collective planning step of every save (the same plan as a durable save);
2. one small collective: every rank has a free slot, or every rank skips this
   snapshot (a snapshot some ranks lack would be useless, and taking it would
   overwrite the older one they all have);
3. the slot's manifest is removed (the slot no longer holds a snapshot), the
   safetensors header is written, and the tensors' copies are queued into the
   slot at their places in the file: device tensors on a side stream;
4. lazy mode: the call returns; the next optimizer step waits only for the copies
   (a stream wait on the GPU).  Once the bytes are on the host the keeper is told
   to seal the slot: it checksums every block off the training thread and writes
   the manifest (:mod:`~stashpoint.engine.keeper`).

Slots are allocated once (per layout) and reused; the newest sealed slot is never
overwritten, so a snapshot in progress never replaces the newest complete one.
:meth:`MemorySnapshots.persist` turns a sealed snapshot into a durable checkpoint
without a second copy from the device.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from stashpoint import errors
from stashpoint._dist import Coordinator
from stashpoint.engine import keepers, memtier
from stashpoint.engine.async_save import after_staging, optimizers_of
from stashpoint.engine.copies import CopyPairs, engine_for, run_copies
from stashpoint.engine.messages import Outcome, PersistSnapshot, Preempted, Release, Seal
from stashpoint.engine.prepare import inline_values, plan_state
from stashpoint.engine.publish import save_metadata
from stashpoint.engine.slot_file import SlotShape, SlotViews, addresses, slot_shape
from stashpoint.engine.staging import CopyEngine, SharedBuffer
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.engine.writer_client import BackgroundWriter, JobFutures, writer_env
from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
from stashpoint.planning.save_plan import SavePlan
from stashpoint.vocab import IfBusy, SaveMode

#: how long a trainer waits for its keeper to start listening
CONNECT_TIMEOUT_S = 60.0
_IDS = itertools.count(1 << 40)  # job ids apart from the async saves'


class SnapshotHandle:
    """A snapshot in progress: ``staged`` (on the host) and ``sealed`` (checksummed, it exists)."""

    def __init__(self, step: int, slot: int) -> None:
        self.step, self.slot = step, slot
        self._staged = threading.Event()
        self._sealed: Future = Future()
        self.timer = PhaseTimer()
        self.stall_s = 0.0

    def wait_staged(self, timeout: float | None = None) -> None:
        if not self._staged.wait(timeout):
            raise TimeoutError(f"snapshot of step {self.step}: not staged within {timeout}s")

    def done(self) -> bool:
        return self._sealed.done()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the snapshot is sealed; raises what went wrong."""
        try:
            return self._sealed.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"snapshot of step {self.step}: not sealed within {timeout}s") from None

    def add_done_callback(self, fn) -> None:
        self._sealed.add_done_callback(lambda _f: fn(self))


@dataclass
class _Slot:
    index: int
    buffer: SharedBuffer | None = None
    step: int | None = None  # the sealed snapshot it holds
    busy: int = 0  # being written, sealed or persisted (a count)


def connect_keeper(
    root: str, rank: int, *, durable: str | None, reattach_s: float, timeout_s: float
) -> BackgroundWriter:
    """This rank's keeper: the live one (a restarted trainer reattaches), or a new one."""
    address = memtier.keeper_socket(root, rank)
    proc = None
    if not keepers.keeper_alive(root, rank):
        os.makedirs(memtier.rank_dir(root, rank), mode=0o700, exist_ok=True)
        cmd = [sys.executable, "-m", "stashpoint.engine.keeper_main", root, str(rank)]
        cmd += ["--reattach", str(reattach_s), "--timeout", str(timeout_s)]
        if durable is not None:
            cmd += ["--durable", durable]
        # a new session: a signal to the trainer's process group spares the keeper
        proc = subprocess.Popen(cmd, env=writer_env(), start_new_session=True)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            with memtier.socket_address(address) as short:
                return BackgroundWriter.connect(short, proc)
        except OSError as exc:
            if proc is not None and proc.poll() is not None:
                raise errors.WriterError(
                    f"the memory-tier keeper of rank {rank} exited ({proc.returncode})"
                ) from exc
            if time.monotonic() > deadline:
                raise errors.WriterError(
                    f"{address}: the memory-tier keeper did not listen within {CONNECT_TIMEOUT_S:g}s"
                ) from exc
            time.sleep(0.02)


class MemorySnapshots:
    """This rank's memory snapshots in the job's memory tier ``root`` on this node."""

    def __init__(
        self,
        root: str,
        *,
        slots: int = 2,
        durable: str | None = None,
        reattach_s: float = 60.0,
        process_group=None,
        timeout_s: float = 600.0,
        crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
    ) -> None:
        if slots < 2:
            raise errors.InvalidOptionError(f"slots must be 2 or more, not {slots!r}")
        self.root, self.timeout_s, self.crc_block = root, timeout_s, crc_block_bytes
        self.coord = Coordinator(process_group, timeout_s)
        self.rank = self.coord.rank
        self.client = connect_keeper(
            root, self.rank, durable=durable, reattach_s=reattach_s, timeout_s=timeout_s
        )
        self.slots = [_Slot(index=i) for i in range(slots)]
        for m in memtier.read_manifests(root, self.rank):  # what a previous trainer left
            if m.slot < slots:
                self.slots[m.slot].step = m.step
        self._shape: SlotShape | None = None
        self._views: SlotViews | None = None
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    @property
    def memory_bytes(self) -> int:
        """Shared memory held by this rank's slots."""
        return sum(s.buffer.size for s in self.slots if s.buffer is not None)

    # ------------------------------------------------------------------ snapshot

    def snapshot(
        self,
        state: dict,
        step: int,
        *,
        mode: SaveMode = "lazy",
        copy_engine: CopyEngine | None = None,
        device_buffer: bool = False,
        metadata: dict | None = None,
        if_busy: IfBusy = "skip",
    ) -> SnapshotHandle | None:
        """Snapshot ``state`` as of ``step`` (a collective).

        When a rank has no free slot (the previous snapshots are still being sealed or
        persisted), ``if_busy="skip"`` skips this snapshot on every rank (returns None)
        and ``"wait"`` waits for one (at most the timeout).
        """
        t0 = time.perf_counter()
        timer = PhaseTimer()
        planned = plan_state(state, self.coord, f"memory snapshot of step {step}", timer=timer)
        plan, save_id, sources = planned.plan, planned.save_id, planned.sources
        shape = self._shape_of(plan, sources)  # reused while the plan is
        slot = self._agree_on_slot(shape.layout.size, if_busy)
        if slot is None:
            return None
        handle = SnapshotHandle(step, slot.index)
        handle.timer = timer
        with timer.phase("device_to_host"):
            memtier.drop_manifest(self.root, self.rank, slot.index)
            slot.step = None
            pairs = self._pairs(shape, slot, sources, layouts_checked=planned.cached)
            tickets = run_copies(pairs, copy_engine, device_buffer)
        writes = shape.writes
        meta = (
            save_metadata(self.coord.world_size, step, dict(metadata or {}), save_id, planned.layouts)
            if self.coord.is_coordinator
            else None
        )
        seal = Seal(
            job_id=next(_IDS),
            slot=slot.index,
            step=step,
            save_id=save_id,
            rank=self.rank,
            world_size=self.coord.world_size,
            crc_block=self.crc_block,
            file_size=shape.layout.size,
            chunks=shape.chunks,
            ranges=shape.layout.ranges,
            inline=tuple(inline_values(writes, sources)),
            plan_items=plan.items if self.coord.is_coordinator else None,
            metadata=meta,
        )
        after_staging(
            tickets, optimizers_of(state) if mode == "lazy" else None, self._sealer(handle, slot, seal)
        )
        if mode != "lazy":
            handle.wait_staged()
        handle.stall_s = time.perf_counter() - t0
        return handle

    def _shape_of(self, plan: SavePlan, sources: dict) -> SlotShape:
        """This rank's file layout for ``plan``: the same as last time while it still fits."""
        if self._shape is None or not self._shape.fits(plan, sources):
            self._shape, self._views = slot_shape(plan, self.rank, sources), None
        return self._shape

    def _pairs(
        self, shape: SlotShape, slot: _Slot, sources: dict, layouts_checked: bool = False
    ) -> CopyPairs:
        """The copies into ``slot``: reused while the plan, the slot and every tensor's
        memory are the same; stored values (and the header) are written again every time."""
        current = addresses(shape, sources, layouts_checked)
        if self._views is None or self._views.addresses != current:
            self._views = SlotViews(addresses=current)  # tensors moved: drop views of the old ones
        return self._views.copies(shape, (slot.index, id(slot.buffer)), slot.buffer.tensor, sources)

    def _sealer(self, handle: SnapshotHandle, slot: _Slot, seal: Seal):
        def staged(failure: BaseException | None) -> None:
            handle._staged.set()
            if failure is None:
                try:
                    futs = self.client.request(seal.job_id, seal)
                except BaseException as exc:
                    failure = exc
            if failure is not None:
                self._unbusy(slot)
                handle._sealed.set_exception(failure)
                return

            def sealed(f: Future) -> None:
                if f.exception() is None:
                    slot.step = seal.step
                self._unbusy(slot)
                if f.exception() is not None:
                    handle._sealed.set_exception(f.exception())
                else:
                    handle._sealed.set_result(f.result())

            futs.committed.add_done_callback(sealed)

        return staged

    def _agree_on_slot(self, size: int, if_busy: IfBusy) -> _Slot | None:
        agreed = self.coord.run_everywhere(
            "memory snapshot: slot", lambda: self._take_slot(size, if_busy), share=lambda s: s is not None
        )
        if all(agreed.everyone):
            return agreed.mine
        if agreed.mine is not None:
            self._unbusy(agreed.mine)
        return None

    def _free_slots(self) -> list[_Slot]:
        sealed = [s for s in self.slots if s.step is not None]
        newest = max(sealed, key=lambda s: s.step) if sealed else None
        return [s for s in self.slots if not s.busy and s is not newest]

    def _take_slot(self, size: int, if_busy: IfBusy) -> _Slot | None:
        with self._freed:
            if if_busy == "wait" and not self._freed.wait_for(self._free_slots, self.timeout_s):
                raise errors.CoordinationError(f"no snapshot slot freed up within {self.timeout_s:g}s")
            free = self._free_slots()
            if not free:
                return None
            slot = min(free, key=lambda s: -1 if s.step is None else s.step)
            slot.busy += 1
        self._ensure_buffer(slot, size)
        return slot

    def _ensure_buffer(self, slot: _Slot, size: int) -> None:
        if slot.buffer is None or slot.buffer.size != size:
            if slot.buffer is not None:
                slot.buffer.close()
                self._views = None
            path = self.client.allocate_slot(slot.index, size, self.timeout_s)
            slot.buffer = SharedBuffer(path, size, create=False)
            slot.buffer.pin()

    def _unbusy(self, slot: _Slot) -> None:
        with self._freed:
            slot.busy -= 1
            self._freed.notify_all()

    def warmup(self, state: dict, *, device_buffer: bool = False) -> int:
        """Allocate (and page-lock) every slot for ``state`` now (a collective), so no
        snapshot pays it; returns the shared-memory bytes held."""
        planned = plan_state(state, self.coord, "memory snapshot warm-up")
        sources = planned.sources
        shape = self._shape_of(planned.plan, sources)
        for slot in self.slots:
            with self._freed:
                slot.busy += 1
            try:
                self._ensure_buffer(slot, shape.layout.size)
            finally:
                self._unbusy(slot)
        if device_buffer:
            pairs = self._pairs(shape, self.slots[0], sources)
            for device, size in pairs.device_bytes.items():
                engine_for(device, device_buffer=True).reserve(size)
        return self.memory_bytes

    # ------------------------------------------------------------------ persist

    def persist(self, handle: SnapshotHandle, path: str) -> JobFutures:
        """Write ``handle``'s snapshot to ``path`` once sealed (every rank; rank 0 commits)."""
        slot = self.slots[handle.slot]
        with self._lock:
            slot.busy += 1
        out = JobFutures()

        def start(_h: SnapshotHandle) -> None:
            try:
                handle.wait(0)
                jid = next(_IDS)
                msg = PersistSnapshot(job_id=jid, slot=slot.index, path=path, timeout_s=self.timeout_s)
                futs = self.client.request(jid, msg)
            except BaseException as exc:
                self._unbusy(slot)
                out.persisted.set_exception(exc)
                out.committed.set_exception(exc)
                return
            _chain(futs, out, lambda: self._unbusy(slot))

        handle.add_done_callback(start)
        return out

    def newest(self) -> int | None:
        """The newest step this rank holds sealed."""
        steps = [s.step for s in self.slots if s.step is not None]
        return max(steps) if steps else None

    def notify_preempted(self, grace_s: float) -> None:
        """Tell the keeper to persist on its own if nothing is asked within ``grace_s``."""
        self.client.send(Preempted(deadline_unix=time.time() + grace_s))

    def detach(self) -> None:
        """Leave the snapshots with the keeper (a restarted trainer reattaches)."""
        for s in self.slots:
            if s.buffer is not None:
                s.buffer.close()
                s.buffer = None
        self.client.close()

    def release(self) -> None:
        """Training is over: the keeper frees this rank's memory and exits."""
        try:
            self.client.send(Release())
        finally:
            self.detach()


def _chain(src: JobFutures, dst: JobFutures, after) -> None:
    def persisted(f: Future) -> None:
        if f.exception() is None and not dst.persisted.done():
            dst.persisted.set_result(f.result())

    def committed(f: Future) -> None:
        after()
        if f.exception() is not None:
            for d in (dst.persisted, dst.committed):
                if not d.done():
                    d.set_exception(f.exception())
            return
        if not dst.persisted.done():
            dst.persisted.set_result(f.result().bytes_written)
        dst.committed.set_result(f.result())

    src.persisted.add_done_callback(persisted)
    src.committed.add_done_callback(committed)
