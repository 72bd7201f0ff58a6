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
from multiprocessing.connection import Connection

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
from stashpoint.engine.records import FileItem
from stashpoint.engine.shm import reclaim_orphans, shm_path
from stashpoint.engine.staging import SharedBuffer, pack
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.storage import resolve


class _Stop:
    """Queued after the last job: the worker thread ends."""


class _Writer:
    def __init__(self, inbox: Connection, outbox: Connection) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.buffers: dict[str, SharedBuffer] = {}
        self.jobs: queue.Queue[Job | Free | _Stop] = queue.Queue()
        self.lock = threading.Lock()

    def send(self, msg: FromWriter) -> None:
        with self.lock:
            try:
                self.outbox.send(msg)
            except (BrokenPipeError, OSError):  # the trainer is gone; keep working
                pass

    def serve(self) -> None:
        worker = threading.Thread(target=self._work, name="stashpoint-writer")
        worker.start()
        try:
            while True:
                try:
                    msg = self.inbox.recv()
                except (EOFError, OSError):
                    break  # trainer gone: finish what we hold
                if isinstance(msg, Alloc):
                    self._allocate(msg)
                elif isinstance(msg, Free):
                    self.jobs.put(msg)  # after the jobs queued before it
                elif isinstance(msg, Submit):
                    self.jobs.put(msg.job)
                elif isinstance(msg, Shutdown):
                    break
        finally:
            self.jobs.put(_Stop())
            worker.join()
            for buf in self.buffers.values():
                buf.close(unlink=True)

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
            try:
                self.send(Committed(job_id=item.job_id, outcome=self._run(item)))
            except BaseException as exc:  # reported to the trainer, never fatal here
                self.send(Failed(job_id=item.job_id, error=ErrorReport.of(exc)))

    def _run(self, job: Job) -> Outcome:
        timer = PhaseTimer()
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
        try:
            written, size = publisher.write_file(job.rank, items, job.crc_block, timer)
            kept = publisher.write_fragment(job.rank, written, job.grids)
            publisher.deliver(job.rank, [*kept, *job.inline])
        except BaseException as exc:
            if job.rank == 0:  # the coordinator gives up for everyone: staging goes
                publisher.abort()
            else:
                publisher.report_failure(job.rank, exc)
            raise
        self.send(Persisted(job_id=job.job_id, bytes_written=size))
        total = None
        if job.rank == 0:
            try:
                with timer.phase("wait_ranks"):
                    contributions = publisher.collect(job.world_size, job.timeout_s)
            except BaseException:
                publisher.abort()
                raise
            total = publisher.finish(
                job.plan_items, contributions, job.metadata, job.crc_block, timer, job.grids
            ).total_bytes
        else:
            with timer.phase("wait_commit"):
                publisher.wait_committed(job.timeout_s)
        return Outcome(bytes_written=size, total_bytes=total, phase_seconds=dict(timer.seconds))


def main(argv: list[str]) -> int:
    reclaim_orphans()  # staging left by writers that were killed
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    _Writer(inbox, outbox).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
