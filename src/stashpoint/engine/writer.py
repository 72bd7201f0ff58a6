"""The background writer: a long-lived process per trainer that persists staged saves.

The trainer starts it once (``python -m stashpoint.engine.writer``, a fresh
interpreter: no fork of a CUDA process, no re-import of the training script) and
talks to it over two pipes with the typed messages of :mod:`~stashpoint.engine.messages`.
The writer owns the shared staging buffers and publishes each job through a
:class:`~stashpoint.engine.publish.Publisher` (large positional writes from several
threads, checksums, fsync, commit):

* every rank's writer writes its data file and then delivers its chunk records
  into the staging location;
* rank 0's writer collects every rank's records, builds the index and commits;
* the other writers wait until the committed index carries the save's id.

Ranks' writers coordinate through storage alone, so a checkpoint whose data was
staged is committed even if the trainers die: when its pipe closes, a writer
finishes the jobs it holds and exits.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

from stashpoint.engine.messages import (
    Alloc,
    Allocated,
    AllocFailed,
    Committed,
    ErrorReport,
    Failed,
    Free,
    FromWriter,
    Job,
    Outcome,
    Persisted,
    Shutdown,
    Submit,
    apply_env,
)
from stashpoint.engine.publish import Publisher
from stashpoint.engine.records import FileItem, Inline, Written
from stashpoint.engine.shm import reclaim_orphans, shm_path
from stashpoint.engine.staging import SharedBuffer, pack
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.format.grid import TensorGrid
from stashpoint.format.index import SaveMetadata
from stashpoint.planning.save_plan import ItemPlan
from stashpoint.storage import resolve


class _Stop:
    """Queued after the last job: the worker thread ends."""


#: why serving a connection ended: the trainer went away, or asked to stop
Ending = Literal["eof", "shutdown", "release"]


class Writer:
    """Serves one trainer's requests; jobs run in order on one worker thread.

    :meth:`serve` reads one connection until it closes; subclasses (the memory
    tier's keeper) handle more message kinds through :meth:`handle_other` (on the
    reading thread) and :meth:`run_other` (on the worker, in order with the jobs).
    """

    def __init__(self) -> None:
        self.outbox: Connection | None = None
        self.buffers: dict[str, SharedBuffer] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="stashpoint-writer")

    def start(self) -> None:
        self.worker.start()

    def send(self, msg: FromWriter) -> None:
        with self.lock:
            if self.outbox is None:
                return
            try:
                self.outbox.send(msg)
            except (BrokenPipeError, OSError):  # the trainer is gone; keep working
                pass

    def serve(self, inbox: Connection, outbox: Connection) -> Ending:
        """Read requests from ``inbox`` until it closes or the trainer says stop."""
        with self.lock:
            self.outbox = outbox
        try:
            while True:
                try:
                    msg = inbox.recv()
                except (EOFError, OSError):
                    return "eof"  # trainer gone: what we hold is finished in any case
                if isinstance(msg, Alloc):
                    self._allocate(msg)
                elif isinstance(msg, Free):
                    self.jobs.put(msg)  # after the jobs queued before it
                elif isinstance(msg, Submit):
                    self.jobs.put(msg.job)
                elif isinstance(msg, Shutdown):
                    return "shutdown"
                elif self.handle_other(msg):
                    return "release"
        finally:
            with self.lock:
                self.outbox = None

    def handle_other(self, msg: object) -> bool:
        """A message this class does not know; True means "stop serving" (a release)."""
        return False

    def run_other(self, item: object) -> None:
        """A queued item this class does not know (see :meth:`handle_other`)."""

    def stop(self) -> None:
        """Finish the queued jobs, then free the staging buffers."""
        self.jobs.put(_Stop())
        self.worker.join()
        for buf in self.buffers.values():
            buf.close(unlink=True)
        self.buffers.clear()

    def _allocate(self, msg: Alloc) -> None:
        try:
            buf = SharedBuffer(shm_path(msg.tag), msg.size, create=True)
        except Exception as exc:  # reported; the writer keeps serving
            self.send(AllocFailed(tag=msg.tag, error=ErrorReport.of(exc)))
            return
        self.buffers[msg.tag] = buf
        self.send(Allocated(tag=msg.tag, path=buf.path))

    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if isinstance(item, _Stop):
                return
            if isinstance(item, Free):
                buf = self.buffers.pop(item.tag, None)
                if buf is not None:
                    buf.close(unlink=True)
                continue
            if not isinstance(item, Job):
                self.run_other(item)
                continue
            try:
                self.send(Committed(job_id=item.job_id, outcome=self._run(item)))
            except BaseException as exc:  # reported to the trainer, never fatal here
                self.send(Failed(job_id=item.job_id, error=ErrorReport.of(exc)))

    def _run(self, job: Job) -> Outcome:
        if job.env:
            apply_env(job.env)
        storage, final = resolve(job.path)
        publisher = Publisher(storage, final, token=job.token, overwrite=job.overwrite, commit=job.commit)
        buf = self.buffers[job.buffer_tag]
        offsets, _ = pack([c.nbytes for c in job.chunks])
        items = [
            FileItem(chunk=c, fetch=lambda c=c, off=off: buf.view(off, c.nbytes))
            for c, off in zip(job.chunks, offsets, strict=True)
        ]
        share = Share(
            rank=job.rank,
            world_size=job.world_size,
            items=items,
            inline=job.inline,
            crc_block=job.crc_block,
            timeout_s=job.timeout_s,
            plan_items=job.plan_items,
            metadata=job.metadata,
            grids=job.grids,
        )
        return publish_share(
            publisher, share, lambda size: self.send(Persisted(job_id=job.job_id, bytes_written=size))
        )


@dataclass(frozen=True, kw_only=True)
class Share:
    """One rank's part of a checkpoint written by writer processes (see the module docstring)."""

    rank: int
    world_size: int
    items: list[FileItem]
    inline: tuple[Inline, ...]
    crc_block: int
    timeout_s: float
    plan_items: dict[str, ItemPlan] | None = None  # rank 0
    metadata: SaveMetadata | None = None  # rank 0
    #: the tensors whose chunks go into index fragments (every rank), see plan_grids
    grids: Mapping[str, TensorGrid] = field(default_factory=dict)
    #: checks this rank's records before they are delivered (e.g. against known checksums)
    check: Callable[[list[Written]], None] | None = None


def publish_share(publisher: Publisher, share: Share, persisted: Callable[[int], None]) -> Outcome:
    """Write this rank's data file, deliver its records; rank 0 collects and commits,
    the others wait for the commit.  ``persisted(size)`` is called once the file is durable."""
    timer = PhaseTimer()
    try:
        written, size = publisher.write_file(share.rank, share.items, share.crc_block, timer)
        if share.check is not None:
            share.check(written)
        kept = publisher.write_fragment(share.rank, written, share.grids)
        publisher.deliver(share.rank, [*kept, *share.inline])
    except BaseException as exc:
        if share.rank == 0:  # the coordinator gives up for everyone: staging goes
            publisher.abort()
        else:
            publisher.report_failure(share.rank, exc)
        raise
    persisted(size)
    total = None
    if share.rank == 0:
        try:
            with timer.phase("wait_ranks"):
                contributions = publisher.collect(share.world_size, share.timeout_s)
        except BaseException:
            publisher.abort()
            raise
        total = publisher.finish(
            share.plan_items, contributions, share.metadata, share.crc_block, timer, share.grids
        ).total_bytes
    else:
        with timer.phase("wait_commit"):
            publisher.wait_committed(share.timeout_s)
    return Outcome(bytes_written=size, total_bytes=total, phase_seconds=dict(timer.seconds))


def main(argv: list[str]) -> int:
    reclaim_orphans()  # staging left by writers that were killed
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    writer = Writer()
    writer.start()
    try:
        writer.serve(inbox, outbox)
    finally:
        writer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
