"""This process's connection to its background writer process (started on first use).

The client sends the typed messages of :mod:`~stashpoint.engine.messages` and turns
the writer's answers into futures: one per staging allocation, and a pair per job
(persisted, committed).  A future is dropped from the client as soon as it is
settled, so a long run of saves holds nothing for the saves that are over.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from stashpoint import errors
from stashpoint.engine.messages import (
    NODE_SERVER_TAG,
    Alloc,
    Allocated,
    AllocFailed,
    Committed,
    Failed,
    Free,
    Job,
    Outcome,
    Persisted,
    ServeNode,
    Shutdown,
    SlotAlloc,
    Submit,
    ToWriter,
)
from stashpoint.engine.staging import SharedBuffer

#: how long the trainer waits at exit for its writer to finish persisting
SHUTDOWN_TIMEOUT_S = float(os.environ.get("STASHPOINT_WRITER_EXIT_TIMEOUT", "600"))


def writer_env() -> dict[str, str]:
    """The environment a writer or keeper process starts with."""
    env = dict(os.environ)
    # the writer only moves bytes: keep it off the GPU and out of the trainer's thread pools
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass(frozen=True)
class JobFutures:
    """The two stages of a submitted job: ``persisted`` (this rank's data file is
    durable; its staging buffer may be reused) and ``committed`` (an :class:`Outcome`)."""

    persisted: Future = field(default_factory=Future)
    committed: Future = field(default_factory=Future)


class BackgroundWriter:
    """This process's connection to its writer process (started on first use)."""

    _instance: BackgroundWriter | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> BackgroundWriter:
        with cls._lock:
            if cls._instance is None or not cls._instance.alive:
                cls._instance = cls.spawn()
            return cls._instance

    def __init__(
        self,
        inbox: Connection,
        outbox: Connection,
        proc: subprocess.Popen | None = None,
        *,
        keeper: bool = False,
    ) -> None:
        """Talk to a writer over ``inbox``/``outbox``; :meth:`spawn` and :meth:`connect` make one.

        ``keeper``: the writer is a memory-tier keeper (:mod:`~stashpoint.engine.keeper`),
        which must outlive this process: at exit the connection is only closed, so the
        keeper waits for a restarted trainer instead of freeing the snapshots.
        """
        self.proc, self.keeper = proc, keeper
        self._sock: socket.socket | None = None
        self._out, self._in = outbox, inbox
        self._send_lock = threading.Lock()
        self._allocations: dict[str, Future] = {}
        self._jobs: dict[int, JobFutures] = {}
        self._waiters_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="stashpoint-writer-client")
        self._reader.start()
        if not keeper:
            atexit.register(self.shutdown)

    @classmethod
    def spawn(cls) -> BackgroundWriter:
        """A new writer process of this trainer, over two pipes."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stashpoint.engine.writer", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            env=writer_env(),
            start_new_session=True,  # a signal to the trainer's process group spares the writer
        )
        os.close(to_child_r)
        os.close(from_child_w)
        return cls(Connection(from_child_r, writable=False), Connection(to_child_w, readable=False), proc)

    @classmethod
    def connect(cls, address: str, proc: subprocess.Popen | None = None) -> BackgroundWriter:
        """A connection to the keeper listening at ``address`` (a Unix socket)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        conn = Connection(os.dup(sock.fileno()))
        client = cls(conn, conn, proc, keeper=True)
        client._sock = sock  # shut down on close: that wakes the reading thread with EOF
        return client

    @property
    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return self._reader.is_alive()

    def close(self) -> None:
        """Drop the connection (a keeper then waits for a restarted trainer)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for conn in {id(self._out): self._out, id(self._in): self._in}.values():
            try:
                conn.close()
            except OSError:
                pass

    @property
    def outstanding(self) -> int:
        """Allocations and jobs still waiting for the writer's answer."""
        with self._waiters_lock:
            return len(self._allocations) + len(self._jobs)

    def _read(self) -> None:
        while True:
            try:
                msg = self._in.recv()
            except (EOFError, OSError):
                break
            self._settle(msg)
        dead = errors.WriterError("the background writer process exited")
        with self._waiters_lock:
            pending = [*self._allocations.values()]
            for futs in self._jobs.values():
                pending += [futs.persisted, futs.committed]
            self._allocations.clear()
            self._jobs.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(dead)

    def _settle(self, msg: Allocated | AllocFailed | Persisted | Committed | Failed) -> None:
        with self._waiters_lock:
            if isinstance(msg, (Allocated, AllocFailed)):
                alloc = self._allocations.pop(msg.tag, None)
                futs = None
            else:
                alloc = None
                # Persisted leaves the job registered until it is committed or failed
                futs = (
                    self._jobs.get(msg.job_id)
                    if isinstance(msg, Persisted)
                    else self._jobs.pop(msg.job_id, None)
                )
        if alloc is not None:
            if isinstance(msg, Allocated):
                alloc.set_result(msg.path)
            else:
                alloc.set_exception(msg.error.rebuild())
        if futs is None:
            return
        if isinstance(msg, Persisted):
            futs.persisted.set_result(msg.bytes_written)
        elif isinstance(msg, Committed):
            if not futs.persisted.done():
                futs.persisted.set_result(msg.outcome.bytes_written)
            futs.committed.set_result(msg.outcome)
        elif isinstance(msg, Failed):
            exc = msg.error.rebuild()
            for fut in (futs.persisted, futs.committed):
                if not fut.done():
                    fut.set_exception(exc)

    def send(self, msg: ToWriter) -> None:
        with self._send_lock:
            try:
                self._out.send(msg)
            except (BrokenPipeError, OSError) as exc:
                raise errors.WriterError(f"the background writer process is gone: {exc}") from exc

    def allocate(self, tag: str, size: int, timeout_s: float) -> SharedBuffer:
        fut: Future = Future()
        with self._waiters_lock:
            self._allocations[tag] = fut
        try:
            self.send(Alloc(tag=tag, size=size))
            path = fut.result(timeout=timeout_s)
        finally:
            with self._waiters_lock:
                self._allocations.pop(tag, None)
        return SharedBuffer(path, size, create=False)

    def free(self, tag: str) -> None:
        """The writer unlinks the buffer once the jobs queued before are done."""
        self.send(Free(tag=tag))

    def submit(self, job: Job) -> JobFutures:
        return self.request(job.job_id, Submit(job=job))

    def request(self, job_id: int, msg: ToWriter) -> JobFutures:
        """Send ``msg``, answered like a job (:class:`Persisted`, :class:`Committed`, :class:`Failed`)."""
        futs = JobFutures()
        with self._waiters_lock:
            self._jobs[job_id] = futs
        try:
            self.send(msg)
        except BaseException:
            with self._waiters_lock:
                self._jobs.pop(job_id, None)
            raise
        return futs

    def allocate_slot(self, slot: int, size: int, timeout_s: float) -> str:
        """A keeper's snapshot slot of ``size`` bytes; returns its path."""
        return self._ask(f"slot-{slot}", SlotAlloc(slot=slot, size=size), timeout_s, f"allocate slot {slot}")

    def serve_node(self, host: str, token: str, timeout_s: float) -> str:
        """Have the keeper serve its node's memory root on ``host``; returns its ``host:port``."""
        return self._ask(NODE_SERVER_TAG, ServeNode(host=host, token=token), timeout_s, f"listen on {host!r}")

    def _ask(self, tag: str, msg: ToWriter, timeout_s: float, what: str) -> str:
        """Send ``msg`` and wait for the writer's :class:`Allocated` answer of ``tag``."""
        fut: Future = Future()
        with self._waiters_lock:
            self._allocations[tag] = fut
        try:
            self.send(msg)
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise errors.WriterError(f"the keeper did not {what} within {timeout_s:g}s") from None
        finally:
            with self._waiters_lock:
                self._allocations.pop(tag, None)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Let the writer finish what it holds, then exit (called at interpreter exit).

        Waits at most ``timeout_s``: past it the trainer exits anyway and the writer,
        which outlives it by design, finishes (and commits) on its own.
        """
        if self.keeper or self.proc is None:
            self.close()
            return
        if self.alive:
            try:
                self.send(Shutdown())
            except errors.WriterError:
                return
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                warnings.warn(
                    f"the checkpoint writer (pid {self.proc.pid}) is still persisting after {timeout_s:g}s; "
                    "exiting without it: it finishes and commits on its own",
                    stacklevel=2,
                )


__all__ = ["BackgroundWriter", "JobFutures", "Outcome"]
