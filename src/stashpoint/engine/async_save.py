"""Asynchronous save: stage into reused host memory, persist in a background process.

Call order (every rank calls :func:`async_save_state` with the same path):

1. the collective planning step of every save (:mod:`~stashpoint.engine.prepare`);
2. this rank's chunks are laid out in a staging buffer from the pool
   (:mod:`~stashpoint.engine.staging_pool`: allocated once, page-locked once, reused;
   at most ``max_in_flight`` saves hold one);
3. copies are queued: device tensors on a side CUDA stream, CPU tensors at once;
   in ``eager`` mode the call returns when the bytes are on the host, in ``lazy``
   mode at once, and an optimizer step pre-hook makes the next optimizer step
   wait for the copies (on the GPU: a stream wait, the host does not block);
4. once staged, the job goes to this process's background writer
   (:mod:`~stashpoint.engine.writer_client`), which writes, fsyncs and commits
   (see :mod:`~stashpoint.engine.writer`).

The returned :class:`SaveHandle` tracks both stages.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from stashpoint import errors, vocab
from stashpoint._dist import Coordinator
from stashpoint._state.flatten import flatten_state
from stashpoint.engine.copies import copy_in, engine_for, pieces_of
from stashpoint.engine.messages import Job, Outcome
from stashpoint.engine.persist import save_grids
from stashpoint.engine.prepare import PreparedSave, inline_values, prepare_save
from stashpoint.engine.publish import save_metadata
from stashpoint.engine.save import check_save_args
from stashpoint.engine.staging import CopyEngine, Ticket, align, pack
from stashpoint.engine.staging_pool import Slot, staging_pool
from stashpoint.engine.telemetry import PhaseTimer, SaveResult, env_telemetry
from stashpoint.engine.tensors import local_tensor
from stashpoint.engine.writer_client import BackgroundWriter, JobFutures
from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
from stashpoint.storage import resolve
from stashpoint.storage.commit import CommitStrategy
from stashpoint.vocab import IfBusy, SaveMode
from stashpoint.wrappers import OptimizerState

# --------------------------------------------------------------------------- handle


class SaveHandle:
    """A save in progress: staged (data on the host) and committed (durable, visible)."""

    def __init__(self, path: str, rank: int, world_size: int, skipped: bool = False, mode: str = "") -> None:
        self.path, self.rank, self.world_size, self.skipped = path, rank, world_size, skipped
        self._staged = threading.Event()
        self._staging_error: BaseException | None = None
        self._committed: Future = Future()
        self.timer = PhaseTimer()
        self.stall_s = 0.0  # time the caller's thread spent inside async_save
        self.pinned_bytes = 0
        self.mode = mode
        if skipped:
            self._staged.set()
            self._committed.set_result(None)

    def staged(self) -> bool:
        return self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until this rank's data is in host memory (the state may then change)."""
        if not self._staged.wait(timeout):
            raise TimeoutError(f"{self.path}: staging not finished within {timeout}s")
        if self._staging_error is not None:
            raise self._staging_error

    def done(self) -> bool:
        return self._committed.done()

    def exception(self) -> BaseException | None:
        return self._committed.exception() if self._committed.done() else None

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until the checkpoint is committed; returns this rank's result (None if skipped)."""
        try:
            return self._committed.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"{self.path}: not committed within {timeout}s") from None

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save is committed or has failed (at once if it is over).

        ``fn`` runs in the thread that settles the save; it should be short.
        """
        self._committed.add_done_callback(lambda _fut: fn(self))

    @classmethod
    def following(
        cls, path: str, coord: Coordinator, futures: JobFutures, *, mode: str, stall_s: float = 0.0
    ) -> SaveHandle:
        """A handle for a save another step already staged (a durable copy of a memory
        snapshot): it is settled by ``futures``."""
        handle = cls(path, coord.rank, coord.world_size, mode=mode)
        handle._staged.set()
        handle.stall_s = stall_s
        futures.committed.add_done_callback(lambda f: _finish(handle, f, coord))
        return handle

    def _staging_failed(self, exc: BaseException) -> None:
        self._staging_error = exc
        self._staged.set()
        self._committed.set_exception(exc)


# --------------------------------------------------------------------------- async save

_JOB_IDS = itertools.count()


def async_save_state(
    state: dict,
    path: str,
    *,
    mode: SaveMode = "eager",
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
    commit: CommitStrategy | None = None,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
    allow_pickle: bool = False,
    if_busy: IfBusy = "wait",
    copy_engine: CopyEngine | None = None,
    device_buffer: bool = False,
) -> SaveHandle:
    t_call = time.perf_counter()
    mode = vocab.choose("mode", mode, SaveMode)
    if_busy = vocab.choose("if_busy", if_busy, IfBusy)
    user = check_save_args(metadata, crc_block_bytes)
    coord = Coordinator(process_group, timeout_s)
    storage, final = resolve(path)
    if storage.describe(final).startswith("memory://"):
        raise errors.UnsupportedStorageError("async_save needs storage the writer process can reach")
    writer = BackgroundWriter.get()
    handle = SaveHandle(storage.describe(final), coord.rank, coord.world_size, mode=mode)
    prepared = prepare_save(state, coord, storage, final, commit, overwrite, allow_pickle, timer=handle.timer)
    writes = prepared.plan.writes[coord.rank]
    pieces = pieces_of(writes, prepared.sources)
    offsets, size = pack([p.chunk.nbytes for p in pieces])
    with handle.timer.phase("wait_buffer"):
        slot = _agree_on_slot(coord, writer, size, if_busy, timeout_s)
    if slot is None:
        return SaveHandle(handle.path, coord.rank, coord.world_size, skipped=True, mode=mode)
    handle.pinned_bytes = staging_pool().pinned_bytes
    with handle.timer.phase("device_to_host"):
        tickets = copy_in(slot.buffer.tensor, pieces, offsets, copy_engine, device_buffer)
    job = Job(
        job_id=next(_JOB_IDS),
        token=prepared.publisher.token,
        rank=coord.rank,
        world_size=coord.world_size,
        path=path,
        buffer_tag=slot.tag,
        chunks=tuple(p.chunk for p in pieces),
        inline=tuple(inline_values(writes, prepared.sources)),
        crc_block=crc_block_bytes,
        timeout_s=timeout_s,
        overwrite=overwrite,
        commit=prepared.publisher.commit,
        grids=save_grids(prepared.plan),
        **_coordinator_part(coord, prepared, step, user),
    )
    _launch(handle, job, slot, tickets, writer, coord, optimizers_of(state) if mode == "lazy" else None)
    handle.stall_s = time.perf_counter() - t_call
    return handle


def _coordinator_part(coord: Coordinator, prepared: PreparedSave, step: int | None, user: dict) -> dict:
    """What only rank 0's job carries: the plan and the metadata the index is built from."""
    if not coord.is_coordinator:
        return {}
    meta = save_metadata(coord.world_size, step, user, prepared.publisher.token, prepared.layouts)
    return {"plan_items": prepared.plan.items, "metadata": meta}


def _agree_on_slot(
    coord: Coordinator, writer: BackgroundWriter, size: int, if_busy: IfBusy, timeout_s: float
):
    """A staging buffer for this save, or None on every rank: all skip, or none would commit."""
    pool = staging_pool()
    agreed = coord.run_everywhere(
        "async save: staging buffer",
        lambda: pool.acquire(writer, size, if_busy, timeout_s),
        share=lambda s: s is not None,
    )
    if all(agreed.everyone):
        return agreed.mine
    if agreed.mine is not None:
        pool.release(agreed.mine)
    return None


def after_staging(
    tickets: list[Ticket],
    optimizers: list[torch.optim.Optimizer] | None,
    then: Callable[[BaseException | None], None],
) -> None:
    """Call ``then(None)`` once the copies are on the host (``then(error)`` if they failed).

    Eager (``optimizers`` is None): now, in this thread.  Lazy: from a thread, and the
    next step of each optimizer waits for the copies first (on the GPU a stream wait:
    the host does not block) -- the only hard ordering, since that step modifies the
    tensors being copied.
    """
    hooks = []

    def staged() -> None:
        try:
            for t in tickets:
                t.wait()
        except BaseException as exc:  # the copies failed: nothing to persist
            then(exc)
            return
        finally:
            for h in hooks:
                h.remove()
        then(None)

    if optimizers is not None and not all(t.done() for t in tickets):

        def before_step(*_args) -> None:
            for t in tickets:
                t.order_before_compute()

        for optim in optimizers:
            hooks.append(optim.register_step_pre_hook(before_step))
        threading.Thread(target=staged, daemon=True, name="stashpoint-stage").start()
    else:
        staged()


def _launch(
    handle: SaveHandle,
    job: Job,
    slot: Slot,
    tickets: list[Ticket],
    writer: BackgroundWriter,
    coord: Coordinator,
    optimizers: list[torch.optim.Optimizer] | None,
) -> None:
    """Hand the job to the writer once staged (see :func:`after_staging`)."""
    pool = staging_pool()

    def submit(failure: BaseException | None) -> None:
        if failure is not None:
            pool.release(slot)
            handle._staging_failed(failure)
            return
        handle._staged.set()
        try:
            futures = writer.submit(job)
        except BaseException as exc:
            pool.release(slot)
            handle._committed.set_exception(exc)
            return
        futures.persisted.add_done_callback(lambda _f: pool.release(slot))
        futures.committed.add_done_callback(lambda f: _finish(handle, f, coord))

    after_staging(tickets, optimizers, submit)
    if optimizers is None:
        handle.wait_staged()


def optimizers_of(state: dict) -> list[torch.optim.Optimizer]:
    out = []
    for v in state.values():
        if isinstance(v, torch.optim.Optimizer):
            out.append(v)
        elif isinstance(v, OptimizerState):
            out.append(v.optimizer)
    return out


def _finish(handle: SaveHandle, fut: Future, coord: Coordinator) -> None:
    exc = fut.exception()
    if exc is not None:
        handle._committed.set_exception(exc)
        return
    outcome: Outcome = fut.result()
    phases = dict(handle.timer.seconds)
    for k, v in outcome.phase_seconds.items():
        phases[k] = phases.get(k, 0.0) + v
    result = SaveResult(
        path=handle.path,
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_written=outcome.bytes_written,
        total_bytes=outcome.total_bytes or 0,
        phase_seconds=phases,
    )
    env_telemetry("save", result, mode=handle.mode, stall_s=handle.stall_s)
    handle._committed.set_result(result)


def warmup(state: dict, *, device_buffer: bool = False, timeout_s: float = 600.0) -> int:
    """Start the writer and allocate (and page-lock) staging for ``state`` ahead of time.

    Not a collective.  Sizes the buffer for every tensor this rank holds (an upper
    bound of what it writes), so the first :func:`async_save_state` pays no
    allocation; returns the staging bytes now held.
    """
    writer = BackgroundWriter.get()
    total, per_device = 0, {}
    for leaf in flatten_state(state).leaves.values():
        if isinstance(leaf.value, torch.Tensor):
            t = local_tensor(leaf.value)
            n = align(t.numel() * t.element_size())
            total += n
            if t.is_cuda:
                per_device[t.device] = per_device.get(t.device, 0) + n
    pool = staging_pool()
    slot = pool.acquire(writer, total, "wait", timeout_s)
    pool.release(slot)
    if device_buffer:
        for device, n in per_device.items():
            engine = engine_for(device, {}, True)
            engine.reserve(n)
    return pool.staged_bytes


__all__ = ["BackgroundWriter", "SaveHandle", "async_save_state", "staging_pool", "warmup"]
