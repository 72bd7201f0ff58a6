"""Host staging memory shared with the background writer, and the copy engines.

A :class:`SharedBuffer` is a file in ``/dev/shm`` mapped by both the trainer and
its writer process: the trainer copies tensors in, the writer writes them out,
and no byte crosses a pipe.  The writer creates and owns the file, so a trainer
that dies after staging leaves the data with the writer.  On a machine with CUDA
the trainer also page-locks the mapping (``cudaHostRegister``) once, so
device-to-host copies run at full speed and asynchronously; the buffers are
reused across saves.

A copy engine moves tensors into staging:

* :class:`CudaCopyEngine`: copies on a side stream, ordered after the work
  already queued on the current stream; ``Ticket.order_before_compute`` makes the
  current stream wait for the copies without blocking the host.
* :class:`ThreadCopyEngine`: the same interface on the CPU, copies in a thread
  (used to test the ordering guarantees on machines without a GPU).
* :class:`InlineCopyEngine`: copies at once (CPU tensors by default).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

from stashpoint.errors import StagingMemoryError

ALIGN = 4096


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(sizes: list[int]) -> tuple[list[int], int]:
    """Where blocks of ``sizes`` go one after the other in a buffer, each at an aligned
    offset, and the bytes they span (trainer and writer agree on it without sending it)."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end = align(end + n)
    return offsets, end


class SharedBuffer:
    """A named, file-backed shared mapping; ``create`` in the owner, ``attach`` elsewhere."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        self.path, self.size = path, size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # reserve the pages now: a sparse file on a small /dev/shm would turn the
                # first copy past the limit into SIGBUS instead of a clear error here
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    os.close(fd)
                    fd = -1
                    os.unlink(path)
                    raise StagingMemoryError(
                        f"cannot reserve {size} bytes of staging memory in {os.path.dirname(path)} "
                        f"({exc}): an async save stages the whole state there; enlarge it "
                        "(docker run --shm-size=..., a Kubernetes emptyDir with medium: Memory) or "
                        "point STASHPOINT_SHM_DIR at a larger tmpfs"
                    ) from exc
            self._mmap = mmap.mmap(fd, size)
        finally:
            if fd >= 0:
                os.close(fd)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.pinned = False

    def pin(self) -> bool:
        """Page-lock the mapping for fast, asynchronous device-to-host copies (CUDA only)."""
        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.size, 0)
        self.pinned = int(rc) == 0
        if not self.pinned:
            # the failure stays as the runtime's last error, which the next kernel launch
            # would report as its own ("invalid argument" from an unrelated copy)
            clear_cuda_error()
            warnings.warn(
                f"{self.path}: staging memory could not be page-locked (CUDA error {int(rc)}; "
                "a file system other than tmpfs?); copies to it are synchronous and slower",
                stacklevel=2,
            )
        return self.pinned

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._mmap)[offset : offset + nbytes]

    def close(self, unlink: bool = False) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        self.tensor = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it at exit
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True, kw_only=True)
class DeviceCopies:
    """One device's copies into a host buffer: destination views (of the buffer), their
    sources, the views' byte offsets in the buffer, and ``runs``: the ``[start, end)``
    ranges of the buffer that this device's copies alone fill (gaps between them are
    padding nobody writes), so a run may be copied as one block."""

    dsts: list[torch.Tensor]
    srcs: list[torch.Tensor]
    offsets: list[int]
    runs: tuple[tuple[int, int], ...] = ()

    @property
    def span(self) -> int:
        """Bytes of the buffer up to the end of the last run."""
        return max((end for _, end in self.runs), default=0)


def merged_runs(owners: list[tuple[int, int, object]]) -> dict[object, tuple[tuple[int, int], ...]]:
    """``owner -> runs`` from ``(start, end, owner)`` byte ranges of one buffer: ranges next
    to each other in offset order, with the same owner, make one run (empty ranges
    are left out).  Owner None (bytes written otherwise) only splits runs."""
    runs: dict[object, list[list[int]]] = {}
    last = None
    for start, end, owner in sorted((o for o in owners if o[1] > o[0]), key=lambda o: o[0]):
        if owner is not None and owner == last:
            runs[owner][-1][1] = end
        elif owner is not None:
            runs.setdefault(owner, []).append([start, end])
        last = owner
    return {owner: tuple((a, b) for a, b in rs) for owner, rs in runs.items()}


def clear_cuda_error() -> None:
    """Read (and so clear) the CUDA runtime's last error, through the runtime torch loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return
    for path in paths:
        ctypes.CDLL(path).cudaGetLastError()


class Ticket:
    """Completion of one batch of staging copies."""

    def wait(self) -> None:
        """Block the host until every copy of the batch is done."""

    def done(self) -> bool:
        return True

    def order_before_compute(self) -> None:
        """Make later work on the compute side wait for the copies (host may not block)."""
        self.wait()


class CopyEngine:
    """Copies tensors into staging memory; ``finish`` returns a :class:`Ticket`."""

    def begin(self) -> None:
        """Order the copies after the work queued so far (the state is final there)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy_many(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        """Queue many copies at once (one launch where the engine can)."""
        for d, s in zip(dsts, srcs, strict=True):
            self.copy(d, s)

    def copy_into(self, host: torch.Tensor, copies: DeviceCopies) -> None:
        """Queue ``copies`` into ``host``, the buffer their destinations view."""
        self.copy_many(copies.dsts, copies.srcs)

    def finish(self) -> Ticket:
        return Ticket()


class InlineCopyEngine(CopyEngine):
    """Synchronous copies: the data is staged when ``copy`` returns."""


class _CudaTicket(Ticket):
    """``safe``: the sources may change from here on; ``staged``: the bytes are on the host."""

    def __init__(self, safe: torch.cuda.Event, staged: torch.cuda.Event, device: torch.device) -> None:
        self.safe, self.staged, self.device = safe, staged, device

    def wait(self) -> None:
        self.staged.synchronize()

    def done(self) -> bool:
        return self.staged.query()

    def order_before_compute(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.safe)


class CudaCopyEngine(CopyEngine):
    """Device-to-host copies on a side stream, overlapping the next forward/backward.

    With ``device_buffer=True`` the tensors are first copied into a device-side
    snapshot buffer (HBM to HBM, tens of milliseconds for tens of GB) and the
    device-to-host copies run from there: the next optimizer step only waits for
    the fast snapshot, and the slow copy to the host overlaps several steps.  The
    buffer is allocated once and reused; it costs one more copy of the rank's
    state in device memory.
    """

    def __init__(self, device: torch.device | None = None, device_buffer: bool = False) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.device_buffer = device_buffer
        self._buffer: torch.Tensor | None = None
        self._offset = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._views: tuple | None = None
        self._mirrors: dict[tuple, tuple] = {}

    @property
    def device_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def reserve(self, nbytes: int) -> None:
        """Size the device snapshot buffer for a save of ``nbytes`` (grows, never shrinks)."""
        if self.device_buffer and (self._buffer is None or self._buffer.numel() < nbytes):
            self.stream.synchronize()  # the old buffer may still feed copies
            self._buffer, self._views = None, None
            self._mirrors.clear()
            self._buffer = torch.empty(align(nbytes), dtype=torch.uint8, device=self.device)

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._offset = 0
        self._pending = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            if not self.device_buffer:
                dst.copy_(src, non_blocking=True)
                return
            n = dst.numel() * dst.element_size()
            snap = self._buffer[self._offset : self._offset + n].view(dst.dtype).view(dst.shape)
            self._offset = align(self._offset + n)
            snap.copy_(src, non_blocking=True)
            self._pending.append((dst, snap))

    def copy_many(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        """All copies in one stream context and one foreach launch: a per-tensor Python
        loop costs tens of microseconds a tensor, milliseconds for a model's state."""
        with torch.cuda.stream(self.stream):
            if not self.device_buffer:
                torch._foreach_copy_(dsts, srcs, non_blocking=True)
                return
            snaps = self._snapshot_views(dsts)
            torch._foreach_copy_(snaps, srcs, non_blocking=True)
            self._pending.extend(zip(dsts, snaps))

    def copy_into(self, host: torch.Tensor, copies: DeviceCopies) -> None:
        """With a device buffer large enough, mirror ``host``: each source goes to the
        device buffer at its destination's offset (one batched launch; mixed dtypes and
        offsets that are not 16-byte aligned were checked on an H200), and the buffer
        goes to the host run by run -- a few large copies instead of one per tensor.  The views are built
        once per ``copies`` object (a memory snapshot reuses it)."""
        buffer = self._buffer
        if not self.device_buffer or self._offset or buffer is None or buffer.numel() < copies.span:
            self.copy_many(copies.dsts, copies.srcs)
            return
        mirror = self._mirror(host, copies)
        with torch.cuda.stream(self.stream):
            torch._foreach_copy_(mirror.snaps, copies.srcs, non_blocking=True)
        self._pending.extend(mirror.runs)
        self._offset = align(copies.span)

    def _mirror(self, host: torch.Tensor, copies: DeviceCopies) -> _Mirror:
        key = (id(copies), host.data_ptr(), self._buffer.data_ptr())
        got = self._mirrors.get(key)
        if got is not None and got[0]() is copies:
            return got[1]
        mirror = _Mirror.of(self._buffer, host, copies)
        if len(self._mirrors) >= 8:  # a few stagings alternate (snapshot slots); drop the rest
            self._mirrors.clear()
        self._mirrors[key] = (weakref.ref(copies), mirror)
        return mirror

    def _snapshot_views(self, dsts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the device buffer matching ``dsts``; the same list of destinations
        (a reused staging) gets the same views without building them again."""
        key = (id(dsts), len(dsts), self._offset, self._buffer.data_ptr())
        if self._views is not None and self._views[0] == key and self._views[1] is dsts:
            snaps = self._views[2]
            self._offset = self._views[3]
            return snaps
        snaps = []
        for dst in dsts:
            n = dst.numel() * dst.element_size()
            snaps.append(self._buffer[self._offset : self._offset + n].view(dst.dtype).view(dst.shape))
            self._offset = align(self._offset + n)
        self._views = (key, dsts, snaps, self._offset)
        return snaps

    def finish(self) -> Ticket:
        safe = torch.cuda.Event()
        safe.record(self.stream)
        with torch.cuda.stream(self.stream):
            if self._pending:
                dsts, snaps = zip(*self._pending)
                torch._foreach_copy_(list(dsts), list(snaps), non_blocking=True)
        self._pending = []
        staged = torch.cuda.Event()
        staged.record(self.stream)
        return _CudaTicket(safe, staged, self.device)


@dataclass(frozen=True, kw_only=True)
class _Mirror:
    """A staging mirrored in a device buffer: the views each source is copied to (at its
    destination's offset), and the runs to copy to the host."""

    snaps: list[torch.Tensor]
    runs: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, buffer: torch.Tensor, host: torch.Tensor, copies: DeviceCopies) -> _Mirror:
        snaps = [
            buffer[off : off + d.numel() * d.element_size()].view(d.dtype).view(d.shape)
            for d, off in zip(copies.dsts, copies.offsets, strict=True)
        ]
        return cls(snaps=snaps, runs=[(host[a:b], buffer[a:b]) for a, b in copies.runs])


class _ThreadTicket(Ticket):
    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def done(self) -> bool:
        return self._done.is_set()


class ThreadCopyEngine(CopyEngine):
    """CPU copies in a background thread, behind the same interface as the CUDA engine."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._delay = delay_s  # tests widen the race window with it
        threading.Thread(target=self._run, daemon=True, name="stashpoint-copy").start()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._batch.append((dst, src))

    def finish(self) -> Ticket:
        ticket = _ThreadTicket()
        self._queue.put((self._batch, ticket))
        self._batch = []
        return ticket

    def _run(self) -> None:
        while True:
            batch, ticket = self._queue.get()
            try:
                for dst, src in batch:
                    if self._delay:
                        threading.Event().wait(self._delay)
                    dst.copy_(src)
            except BaseException as exc:  # handed to whoever waits on the ticket
                ticket.error = exc
            ticket._done.set()
