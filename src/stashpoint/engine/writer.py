"""The background writer: a long-lived process per trainer that persists staged saves.

The trainer starts it once (``python -m stashpoint.engine.writer``, a fresh
interpreter: no fork of a CUDA process, no re-import of the training script) and
talks to it over two pipes.  The writer owns the shared staging buffers, writes
each job's data file with large positional writes from several threads, computes
checksums, fsyncs, and commits:

* every rank's writer writes its data file and then a small manifest of its chunk
  records into the staging location;
* rank 0's writer waits for all manifests, builds the index and commits;
* the other writers wait until the committed index carries the save's id.

Ranks' writers coordinate through storage alone, so a checkpoint whose data was
staged is committed even if the trainers die: when its pipe closes, a writer
finishes the jobs it holds and exits.

Messages (pickled tuples) trainer -> writer: ``("alloc", tag, size)``,
``("free", tag)``, ``("job", Job)``, ``("shutdown",)``.  Writer -> trainer:
``("allocated", tag, path)``, ``("alloc_failed", tag, error_name, message)``,
``("persisted", job_id, info)``,
``("committed", job_id, info)``, ``("failed", job_id, error_name, message)``.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from stashpoint.engine.persist import (
    FileItem,
    Written,
    build_index,
    commit_index,
    manifest_name,
    read_manifest,
    write_data_file,
    write_manifest,
)
from stashpoint.engine.staging import SharedBuffer, shm_path
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.format.index import INDEX_FILE, SaveMetadata
from stashpoint.format.safetensors_file import FileEntry
from stashpoint.planning.save_plan import ItemPlan
from stashpoint.storage.commit import CommitStrategy

POLL_S = 0.02


@dataclass(frozen=True)
class StagedItem:
    """One chunk in a staging buffer: where its bytes are and what they are."""

    fqn: str
    per_rank: bool
    key: str
    dtype: str  # torch dtype name of the bytes ("uint8" for pickles)
    dtype_name: str  # index dtype ("" for pickles)
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    buffer_offset: int
    nbytes: int


@dataclass(frozen=True)
class Job:
    job_id: int
    save_id: str
    rank: int
    world_size: int
    path: str  # the checkpoint URL or path, resolved again here
    staging: str
    file_name: str
    buffer_tag: str
    items: tuple[StagedItem, ...]
    inline: tuple[Written, ...]
    crc_block: int
    timeout_s: float
    overwrite: bool
    commit: CommitStrategy
    # rank 0 only: what the index is built from
    plan_items: dict[str, ItemPlan] | None = None
    metadata: SaveMetadata | None = None
    submitted_unix: float = field(default_factory=time.time)
    #: the trainer's storage settings when it asked (see :func:`storage_env`)
    env: tuple[tuple[str, str], ...] = ()


#: environment variables that choose where and how storage is reached
_STORAGE_ENV_PREFIXES = ("AWS_", "STASHPOINT_")


def storage_env() -> tuple[tuple[str, str], ...]:
    """The caller's storage settings, sent with every job.

    The writer process outlives the settings it started with: a trainer (or a test)
    may set credentials or endpoints later, and each save must use the ones in force
    when it was requested.
    """
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_STORAGE_ENV_PREFIXES)))


def _apply_env(env: tuple[tuple[str, str], ...]) -> None:
    wanted = dict(env)
    for key in [k for k in os.environ if k.startswith(_STORAGE_ENV_PREFIXES) and k not in wanted]:
        del os.environ[key]
    os.environ.update(wanted)


class _Writer:
    def __init__(self, inbox: Connection, outbox: Connection) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.buffers: dict[str, SharedBuffer] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()

    def send(self, *msg) -> None:
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
                if msg[0] == "alloc":
                    _, tag, size = msg
                    try:
                        buf = SharedBuffer(shm_path(tag), size, create=True)
                    except Exception as exc:  # reported; the writer keeps serving
                        self.send("alloc_failed", tag, type(exc).__name__, str(exc))
                        continue
                    self.buffers[tag] = buf
                    self.send("allocated", tag, buf.path)
                elif msg[0] == "free":
                    self.jobs.put(("free", msg[1]))  # after the jobs queued before it
                elif msg[0] == "job":
                    self.jobs.put(("job", msg[1]))
                elif msg[0] == "shutdown":
                    break
        finally:
            self.jobs.put(("stop", None))
            worker.join()
            for buf in self.buffers.values():
                buf.close(unlink=True)

    def _work(self) -> None:
        while True:
            kind, arg = self.jobs.get()
            if kind == "stop":
                return
            if kind == "free":
                buf = self.buffers.pop(arg, None)
                if buf is not None:
                    buf.close(unlink=True)
                continue
            job: Job = arg
            try:
                info = self._run(job)
                self.send("committed", job.job_id, info)
            except BaseException as exc:  # reported to the trainer, never fatal here
                self.send("failed", job.job_id, type(exc).__name__, f"{exc}")

    def _run(self, job: Job) -> dict:
        from stashpoint.format.dtypes import dtype_from_name
        from stashpoint.storage import resolve

        timer = PhaseTimer()
        if job.env:
            _apply_env(job.env)
        storage, final = resolve(job.path)
        buf = self.buffers[job.buffer_tag]
        items = [
            FileItem(
                it.fqn,
                it.per_rank,
                FileEntry(it.key, dtype_from_name(it.dtype), it.shape, it.nbytes),
                it.dtype_name,
                it.offsets,
                lambda it=it: buf.view(it.buffer_offset, it.nbytes),
            )
            for it in job.items
        ]
        try:
            storage.make_prefix(job.staging)
            written, size = write_data_file(storage, job.staging, job.file_name, items, job.crc_block, timer)
            write_manifest(storage, job.staging, job.rank, written + list(job.inline))
        except BaseException as exc:
            if job.rank == 0:  # the coordinator gives up for everyone: staging goes
                job.commit.abort(storage, job.staging, final)
            else:
                _write_failure(storage, job, exc)
            raise
        self.send("persisted", job.job_id, {"bytes_written": size})
        if job.rank == 0:
            total = self._commit(storage, final, job, timer)
        else:
            with timer.phase("wait_commit"):
                _wait_for_commit(storage, final, job)
            total = None
        return {"bytes_written": size, "total_bytes": total, "phase_seconds": dict(timer.seconds)}

    def _commit(self, storage, final: str, job: Job, timer: PhaseTimer) -> int:
        deadline = time.monotonic() + job.timeout_s
        written: list[list[Written]] = []
        try:
            with timer.phase("wait_ranks"):
                for rank in range(job.world_size):
                    written.append(_wait_manifest(storage, job, rank, deadline))
            index = build_index(job.plan_items, written, job.metadata, job.crc_block)
            for rank in range(job.world_size):
                storage.delete(storage.join(job.staging, manifest_name(rank)))
            commit_index(storage, job.staging, final, job.commit, index, job.overwrite, timer)
        except BaseException:
            job.commit.abort(storage, job.staging, final)
            raise
        return index.total_bytes


def _write_failure(storage, job: Job, exc: BaseException) -> None:
    """Tell rank 0's writer (through storage) that this rank cannot deliver."""
    import json

    try:
        doc = {"error": f"{type(exc).__name__}: {exc}"}
        storage.write_bytes(storage.join(job.staging, manifest_name(job.rank)), json.dumps(doc).encode())
    except Exception:  # storage itself may be what failed; rank 0 then times out
        pass


def _wait_manifest(storage, job: Job, rank: int, deadline: float) -> list[Written]:
    import json

    from stashpoint.errors import CoordinationError, RemoteRankError

    name = storage.join(job.staging, manifest_name(rank))
    while not storage.exists(name):
        if time.monotonic() > deadline:
            raise CoordinationError(
                f"{job.path}: rank {rank} did not deliver its data within {job.timeout_s:g}s"
            )
        time.sleep(POLL_S)
    doc = json.loads(storage.read_bytes(name))
    if isinstance(doc, dict) and "error" in doc:
        raise RemoteRankError(f"{job.path}: rank {rank} failed to write its data: {doc['error']}")
    return read_manifest(storage, job.staging, rank)


def _wait_for_commit(storage, final: str, job: Job) -> None:
    from stashpoint.errors import CoordinationError, RemoteRankError
    from stashpoint.format.index import Index

    deadline = time.monotonic() + job.timeout_s
    index_path = storage.join(final, INDEX_FILE)
    while True:
        if storage.exists(index_path):
            try:
                index = Index.from_json(storage.read_bytes(index_path), job.path)
                if index.metadata.save_id == job.save_id:
                    return
            except Exception:  # being replaced right now; look again
                pass
        if job.staging != final and not storage.exists(job.staging):
            # staging vanished without our index appearing: the save was aborted
            time.sleep(POLL_S * 5)
            if not _committed(storage, index_path, job):
                raise RemoteRankError(f"{job.path}: the save was aborted by another rank")
            return
        if time.monotonic() > deadline:
            raise CoordinationError(f"{job.path}: not committed within {job.timeout_s:g}s")
        time.sleep(POLL_S)


def _committed(storage, index_path: str, job: Job) -> bool:
    from stashpoint.format.index import Index

    try:
        return Index.from_json(storage.read_bytes(index_path), job.path).metadata.save_id == job.save_id
    except Exception:
        return False


def main(argv: list[str]) -> int:
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    _Writer(inbox, outbox).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
