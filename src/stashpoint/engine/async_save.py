"""Asynchronous save: stage into reused host memory, persist in a background process.

Call order (every rank calls :func:`async_save_state` with the same path):

1. the collective planning step of every save (:mod:`~stashpoint.engine.prepare`);
2. this rank's chunks are laid out in a staging buffer from the pool (allocated
   once, page-locked once, reused; at most ``max_in_flight`` saves hold one);
3. copies are queued: device tensors on a side CUDA stream, CPU tensors at once;
   in ``eager`` mode the call returns when the bytes are on the host, in ``lazy``
   mode at once, and an optimizer step pre-hook makes the next optimizer step
   wait for the copies (on the GPU: a stream wait, the host does not block);
4. once staged, the job goes to this process's background writer, which writes,
   fsyncs and commits (see :mod:`~stashpoint.engine.writer`).

The returned :class:`SaveHandle` tracks both stages.
"""

from __future__ import annotations

import atexit
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from stashpoint import errors
from stashpoint._dist import Coordinator
from stashpoint.engine.persist import data_file_name
from stashpoint.engine.prepare import inline_values, prepare_save
from stashpoint.engine.save import check_save_args, save_metadata
from stashpoint.engine.staging import (
    CopyEngine,
    CudaCopyEngine,
    InlineCopyEngine,
    SharedBuffer,
    align,
)
from stashpoint.engine.telemetry import PhaseTimer, SaveResult, env_telemetry
from stashpoint.engine.tensors import region
from stashpoint.engine.writer import Job, StagedItem, storage_env
from stashpoint.format.dtypes import dtype_name
from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
from stashpoint.storage import resolve
from stashpoint.storage.commit import CommitStrategy, default_commit

#: extra room in a new staging buffer, so small changes in the state reuse it
SLACK_BYTES = 64 << 20


# --------------------------------------------------------------------------- writer client


class BackgroundWriter:
    """This process's connection to its writer process (started on first use)."""

    _instance: BackgroundWriter | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> BackgroundWriter:
        with cls._lock:
            if cls._instance is None or not cls._instance.alive:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the writer only moves bytes: keep it off the GPU and out of the trainer's thread pools
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stashpoint.engine.writer", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            env=env,
            start_new_session=True,  # a signal to the trainer's process group spares the writer
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = Connection(to_child_w, readable=False)
        self._in = Connection(from_child_r, writable=False)
        self._send_lock = threading.Lock()
        self._waiters: dict[tuple, Future] = {}
        self._waiters_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="stashpoint-writer-client")
        self._reader.start()
        atexit.register(self.shutdown)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _future(self, key: tuple) -> Future:
        with self._waiters_lock:
            return self._waiters.setdefault(key, Future())

    def _read(self) -> None:
        while True:
            try:
                msg = self._in.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "allocated":
                self._future(("allocated", msg[1])).set_result(msg[2])
            elif kind == "alloc_failed":
                self._future(("allocated", msg[1])).set_exception(_rebuild_error(msg[2], msg[3]))
            elif kind in ("persisted", "committed"):
                self._future((kind, msg[1])).set_result(msg[2])
            elif kind == "failed":
                exc = _rebuild_error(msg[2], msg[3])
                for k in ("persisted", "committed"):
                    fut = self._future((k, msg[1]))
                    if not fut.done():
                        fut.set_exception(exc)
        dead = errors.WriterError("the background writer process exited")
        with self._waiters_lock:
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(dead)

    def send(self, *msg) -> None:
        with self._send_lock:
            try:
                self._out.send(msg)
            except (BrokenPipeError, OSError) as exc:
                raise errors.WriterError(f"the background writer process is gone: {exc}") from exc

    def allocate(self, tag: str, size: int, timeout_s: float) -> SharedBuffer:
        fut = self._future(("allocated", tag))
        self.send("alloc", tag, size)
        path = fut.result(timeout=timeout_s)
        return SharedBuffer(path, size, create=False)

    def submit(self, job: Job) -> tuple[Future, Future]:
        persisted, committed = (
            self._future(("persisted", job.job_id)),
            self._future(("committed", job.job_id)),
        )
        self.send("job", job)
        return persisted, committed

    def shutdown(self) -> None:
        """Let the writer finish what it holds, then exit (called at interpreter exit)."""
        if self.alive:
            try:
                self.send("shutdown")
            except errors.WriterError:
                return
            self.proc.wait()


def _rebuild_error(name: str, message: str) -> BaseException:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.StashpointError):
        return cls(message)
    return errors.WriterError(f"{name}: {message}")


# --------------------------------------------------------------------------- staging pool


@dataclass
class _Slot:
    tag: str
    buffer: SharedBuffer
    writer: BackgroundWriter  # the process that owns the buffer
    busy: bool = False


@dataclass
class StagingPool:
    """Staging buffers reused across saves; at most ``max_in_flight`` in use at once."""

    max_in_flight: int = 1
    slots: list[_Slot] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    counter: itertools.count = field(default_factory=itertools.count)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.buffer.size for s in self.slots if s.buffer.pinned)

    @property
    def staged_bytes(self) -> int:
        return sum(s.buffer.size for s in self.slots)

    def acquire(self, writer: BackgroundWriter, size: int, policy: str, timeout_s: float) -> _Slot | None:
        with self.cond:
            # buffers of a writer process that died went with it
            for dead in [s for s in self.slots if s.writer is not writer and not s.busy]:
                self.slots.remove(dead)
                dead.buffer.close()
            while True:
                free = [s for s in self.slots if not s.busy]
                if free or len(self.slots) < self.max_in_flight:
                    break
                if policy == "skip":
                    return None
                if not self.cond.wait(timeout=timeout_s):
                    raise errors.CoordinationError(f"no staging buffer freed up within {timeout_s:g}s")
            slot = next((s for s in free if s.buffer.size >= size), None)
            if slot is None:
                if free:  # too small: replace the smallest free one
                    old = min(free, key=lambda s: s.buffer.size)
                    self.slots.remove(old)
                    old.buffer.close()
                    writer.send("free", old.tag)
                tag = f"slot{next(self.counter)}"
                buf = writer.allocate(tag, align(size + SLACK_BYTES), timeout_s)
                buf.pin()
                slot = _Slot(tag, buf, writer)
                self.slots.append(slot)
            slot.busy = True
            return slot

    def release(self, slot: _Slot) -> None:
        with self.cond:
            slot.busy = False
            self.cond.notify_all()


_POOL = StagingPool()


def staging_pool() -> StagingPool:
    return _POOL


# --------------------------------------------------------------------------- handle


class SaveHandle:
    """A save in progress: staged (data on the host) and committed (durable, visible)."""

    def __init__(self, path: str, rank: int, world_size: int, skipped: bool = False) -> None:
        self.path, self.rank, self.world_size, self.skipped = path, rank, world_size, skipped
        self._staged = threading.Event()
        self._staging_error: BaseException | None = None
        self._committed: Future = Future()
        self.timer = PhaseTimer()
        self.stall_s = 0.0  # time the caller's thread spent inside async_save
        self.pinned_bytes = 0
        self.mode = ""
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

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        """Call ``fn(self)`` once the save has committed or failed (at once if it already has)."""
        self._committed.add_done_callback(lambda _future: fn(self))

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until the checkpoint is committed; returns this rank's result (None if skipped)."""
        try:
            return self._committed.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"{self.path}: not committed within {timeout}s") from None


# --------------------------------------------------------------------------- async save

_JOB_IDS = itertools.count()


def _optimizers(state: dict) -> list[torch.optim.Optimizer]:
    from stashpoint.wrappers import OptimizerState

    out = []
    for v in state.values():
        if isinstance(v, torch.optim.Optimizer):
            out.append(v)
        elif isinstance(v, OptimizerState):
            out.append(v.optimizer)
    return out


def async_save_state(
    state: dict,
    path: str,
    *,
    mode: str = "eager",
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
    commit: CommitStrategy | None = None,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
    allow_pickle: bool = False,
    if_busy: str = "wait",
    copy_engine: CopyEngine | None = None,
    device_buffer: bool = False,
) -> SaveHandle:
    if mode not in ("eager", "lazy"):
        raise ValueError(f"mode must be 'eager' or 'lazy', not {mode!r}")
    if if_busy not in ("wait", "skip"):
        raise ValueError(f"if_busy must be 'wait' or 'skip', not {if_busy!r}")
    t_call = time.perf_counter()
    user = check_save_args(metadata, crc_block_bytes)
    coord = Coordinator(process_group, timeout_s)
    storage, final = resolve(path)
    if storage.describe(final).startswith("memory://"):
        raise errors.UnsupportedStorageError("async_save needs storage the writer process can reach")
    commit = commit or default_commit(storage)
    writer = BackgroundWriter.get()
    pool = staging_pool()

    handle = SaveHandle(storage.describe(final), coord.rank, coord.world_size)
    handle.mode = mode
    with handle.timer.phase("plan"):
        prepared = prepare_save(state, coord, storage, final, commit, overwrite, allow_pickle)
    plan = prepared.plan
    writes = plan.writes[coord.rank]

    # lay out this rank's chunks in a staging buffer
    layout: list[tuple] = []
    offset = 0
    for w in writes:
        src = prepared.sources[w.fqn]
        if isinstance(src, torch.Tensor):
            nbytes = w.box.numel * src.element_size()
        elif src[0] == "json":
            continue
        else:
            nbytes = len(src[1])
        layout.append((w, src, offset, nbytes))
        offset = align(offset + nbytes)

    # every rank takes the same decision to skip, or none would commit
    def take_slot() -> _Slot | None:
        return pool.acquire(writer, offset, if_busy, timeout_s)

    with handle.timer.phase("wait_buffer"):
        agreed = coord.run_everywhere("async save: staging buffer", take_slot, share=lambda s: s is not None)
    slot = agreed.mine
    if not all(agreed.everyone):
        if slot is not None:
            pool.release(slot)
        return SaveHandle(handle.path, coord.rank, coord.world_size, skipped=True)
    handle.pinned_bytes = pool.pinned_bytes

    engines: dict[torch.device, CopyEngine] = {}
    device_bytes: dict[torch.device, int] = {}
    for _w, src, _off, nbytes in layout:
        if isinstance(src, torch.Tensor) and src.is_cuda:
            device_bytes[src.device] = align(device_bytes.get(src.device, 0) + nbytes)
    items: list[StagedItem] = []
    with handle.timer.phase("device_to_host"):
        for w, src, off, nbytes in layout:
            if isinstance(src, torch.Tensor):
                dst = slot.buffer.tensor[off : off + nbytes].view(src.dtype).view(w.box.shape)
                piece = region(src, w.box.local_offsets, w.box.shape)
                engine = copy_engine or _engine_for(src.device, engines, device_buffer)
                if engine not in engines.values():
                    engines[src.device] = engine
                    if isinstance(engine, CudaCopyEngine):
                        engine.reserve(device_bytes.get(src.device, 0))
                    engine.begin()
                engine.copy(dst, piece)
                items.append(
                    StagedItem(
                        w.fqn,
                        w.per_rank,
                        w.file_key,
                        dtype_name(src.dtype),
                        dtype_name(src.dtype),
                        tuple(w.box.shape),
                        tuple(w.box.offsets),
                        off,
                        nbytes,
                    )
                )
            else:
                slot.buffer.tensor[off : off + nbytes].copy_(
                    torch.frombuffer(bytearray(src[1]), dtype=torch.uint8)
                )
                items.append(
                    StagedItem(w.fqn, w.per_rank, w.file_key, "uint8", "", (nbytes,), (0,), off, nbytes)
                )
        tickets = [e.finish() for e in engines.values()]

    job = Job(
        job_id=next(_JOB_IDS),
        save_id=prepared.token,
        rank=coord.rank,
        world_size=coord.world_size,
        path=path,
        staging=prepared.staging,
        file_name=data_file_name(coord.rank),
        buffer_tag=slot.tag,
        items=tuple(items),
        inline=tuple(inline_values(writes, prepared.sources)),
        crc_block=crc_block_bytes,
        timeout_s=timeout_s,
        overwrite=overwrite,
        commit=commit,
        plan_items=plan.items if coord.is_coordinator else None,
        metadata=save_metadata(coord.world_size, step, user, prepared.token)
        if coord.is_coordinator
        else None,
        env=storage_env(),
    )
    hooks = []

    def staged_then_submit() -> None:
        try:
            for t in tickets:
                t.wait()
        except BaseException as exc:  # the copies failed: nothing to persist
            handle._staging_error = exc
            handle._staged.set()
            pool.release(slot)
            handle._committed.set_exception(exc)
            return
        handle._staged.set()
        for h in hooks:
            h.remove()
        try:
            persisted, committed = writer.submit(job)
        except BaseException as exc:
            pool.release(slot)
            handle._committed.set_exception(exc)
            return
        persisted.add_done_callback(lambda _f: pool.release(slot))
        committed.add_done_callback(lambda f: _finish(handle, f, coord, t_submit=time.perf_counter()))

    if mode == "lazy" and not all(t.done() for t in tickets):
        # the only hard ordering: the next optimizer step must not modify un-copied tensors
        def before_step(*_args) -> None:
            for t in tickets:
                t.order_before_compute()

        for optim in _optimizers(state):
            hooks.append(optim.register_step_pre_hook(before_step))
        threading.Thread(target=staged_then_submit, daemon=True, name="stashpoint-stage").start()
    else:
        staged_then_submit()
        handle.wait_staged()
    handle.stall_s = time.perf_counter() - t_call
    return handle


_CUDA_ENGINES: dict[tuple[torch.device, bool], CudaCopyEngine] = {}


def _engine_for(device: torch.device, engines: dict, device_buffer: bool) -> CopyEngine:
    if device in engines:
        return engines[device]
    if device.type == "cuda":
        # one engine per device for the life of the process: its stream and buffer are reused
        key = (device, device_buffer)
        if key not in _CUDA_ENGINES:
            _CUDA_ENGINES[key] = CudaCopyEngine(device, device_buffer=device_buffer)
        return _CUDA_ENGINES[key]
    return InlineCopyEngine()


def _finish(handle: SaveHandle, fut: Future, coord: Coordinator, t_submit: float) -> None:
    exc = fut.exception()
    if exc is not None:
        handle._committed.set_exception(exc)
        return
    info = fut.result()
    phases = dict(handle.timer.seconds)
    for k, v in info["phase_seconds"].items():
        phases[k] = phases.get(k, 0.0) + v
    result = SaveResult(
        path=handle.path,
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_written=info["bytes_written"],
        total_bytes=info["total_bytes"] or 0,
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
    from stashpoint._state import flatten_state
    from stashpoint.engine.tensors import local_tensor

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
            engine = _engine_for(device, {}, True)
            engine.reserve(n)
    return pool.staged_bytes
