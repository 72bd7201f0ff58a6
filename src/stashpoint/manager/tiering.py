"""Two storage tiers: save to a fast local root, upload to object storage in the background.

The manager saves into its root as always (the fast tier, usually a local disk) and
hands every committed checkpoint to an :class:`Uploader`, which copies it to the
remote tier.  An upload is a commit of its own: every data file is copied first and
the index last, through the remote storage's commit strategy, so a half-uploaded
checkpoint is never visible as committed there.  Files are streamed part by part
through one reused buffer, so memory stays at ``part_bytes`` plus what the remote
writer holds (for S3: ``(concurrency + 1) x part_size``), whatever the file sizes.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from stashpoint.engine.publish import Publisher, new_token
from stashpoint.errors import TruncatedDataError, UploadError
from stashpoint.format.index import INDEX_FILE
from stashpoint.storage import Storage, resolve
from stashpoint.storage.commit import CommitStrategy, default_commit


@dataclass(frozen=True)
class UploadPolicy:
    """Where and how committed checkpoints are copied to the remote tier.

    ``remote``: URL or path of the remote root (``s3://bucket/run``, another directory).
    ``keep_local``: committed checkpoints kept in the fast tier, newest first (``None``:
    all); a checkpoint still waiting for its upload, or whose upload failed while the
    retention policy still wants it, is never pruned locally.  The remote tier follows
    the manager's :class:`RetentionPolicy`.
    ``part_bytes``: size of the copy buffer (the read and write unit).
    ``timeout_s``: how long :meth:`CheckpointManager.wait` waits for uploads to drain.
    ``upload_existing``: at start, upload local checkpoints the remote tier lacks
    (e.g. those whose upload a crash interrupted).
    """

    remote: str
    keep_local: int | None = 2
    part_bytes: int = 16 << 20
    timeout_s: float = 3600.0
    upload_existing: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.remote, str) or not self.remote:
            raise ValueError("remote must be a non-empty URL or path")
        if self.keep_local is not None and self.keep_local < 0:
            raise ValueError("keep_local must be 0 or more (None keeps every local copy)")
        if self.part_bytes < 64 << 10:
            raise ValueError("part_bytes must be at least 64 KiB")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


@dataclass(frozen=True)
class UploadFailure:
    """One failed upload: the step, the error, and when it happened (``time.time()``)."""

    step: int
    error: BaseException
    at: float


def copy_file(src: Storage, src_path: str, dst: Storage, dst_path: str, buf: memoryview) -> int:
    """Stream one object from ``src`` to ``dst`` through ``buf``; returns the bytes copied.

    The whole file is never held in memory: each part is read into ``buf`` and handed
    to the destination writer, which copies or sends it before the next read reuses it.
    """
    size = src.size(src_path)
    with dst.open_writer(dst_path, size=size) as writer:
        done = 0
        while done < size:
            part = buf[: min(len(buf), size - done)]
            n = src.read_into(src_path, done, part)
            if n <= 0:
                raise TruncatedDataError(f"{src.describe(src_path)} ended at byte {done} of {size}")
            writer.write(part[:n])
            done += n
    return size


def copy_checkpoint(
    src: Storage, src_path: str, dst: Storage, final: str, commit: CommitStrategy, buf: memoryview
) -> None:
    """Copy a committed checkpoint and publish it at ``final``: data files first, index last.

    On failure whatever was written is removed again, and an existing remote copy at
    ``final`` is either untouched (rename commits) or gone (in-place commits replace it),
    never left half-replaced.
    """
    index = src.read_bytes(src.join(src_path, INDEX_FILE))  # FileNotFoundError: not committed
    names = [n for n in src.list(src_path) if n != INDEX_FILE]
    publisher = Publisher(dst, final, token=new_token(), overwrite=True, commit=commit)
    try:
        publisher.prepare()
        dst.make_prefix(publisher.staging)
        for name in names:
            copy_file(src, src.join(src_path, name), dst, dst.join(publisher.staging, name), buf)
    except BaseException:
        publisher.abort()
        raise
    publisher.finish_with(index)


class Uploader:
    """One background thread that uploads checkpoints in the order they were committed.

    ``on_uploaded(step)`` runs after each successful upload (the manager applies
    retention there).  Failures are warned about at once, recorded in
    :attr:`failures`, and raised by the next :meth:`wait`.
    """

    def __init__(
        self,
        source: Storage,
        source_root: str,
        policy: UploadPolicy,
        name_of: Callable[[int], str],
        on_uploaded: Callable[[int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.source, self.source_root = source, source_root
        self.remote, self.remote_root = resolve(policy.remote)
        self.commit = default_commit(self.remote)
        self._name_of, self._on_uploaded = name_of, on_uploaded
        self._queue: deque[int] = deque()
        self._pending: set[int] = set()  # queued or being uploaded
        self._busy = False  # an upload, or what follows it, is running
        self._cond = threading.Condition()
        self._closed = False
        self.failures: list[UploadFailure] = []
        self._reported = 0
        self._thread: threading.Thread | None = None

    # -- what the manager asks ------------------------------------------------------------

    def remote_path(self, step: int) -> str:
        return self.remote.join(self.remote_root, self._name_of(step))

    def pending(self) -> set[int]:
        """Steps queued or being uploaded."""
        with self._cond:
            return set(self._pending)

    def submit(self, step: int) -> None:
        with self._cond:
            if self._closed:
                raise UploadError(f"upload of step {step}: the uploader is closed")
            if step in self._pending:
                return
            self._pending.add(step)
            self._queue.append(step)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="stashpoint-upload")
                self._thread.start()
            self._cond.notify_all()

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait until nothing is queued; raise :class:`UploadError` for failures not yet raised."""
        deadline = time.monotonic() + (self.policy.timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UploadError(
                        f"uploads to {self.remote.describe(self.remote_root)} still running after "
                        f"{self.policy.timeout_s:.0f} s (steps {sorted(self._pending)})"
                    )
                self._cond.wait(left)
            new = self.failures[self._reported :]
            self._reported = len(self.failures)
        if new:
            steps = ", ".join(str(f.step) for f in new)
            where = self.remote.describe(self.remote_root)
            raise UploadError(f"uploading step(s) {steps} to {where} failed: {new[-1].error}") from new[
                -1
            ].error

    def close(self) -> None:
        """Stop the thread once the queue is empty (call :meth:`wait` first to drain it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and not self._queue:
            thread.join(5.0)  # an upload still running is a daemon thread: it cannot keep the process alive

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        buf = memoryview(bytearray(self.policy.part_bytes))  # the one copy buffer, reused
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(60.0)
                if not self._queue:
                    return
                step = self._queue[0]
                self._busy = True
            try:
                ok = self._upload(step, buf)
                with self._cond:
                    # no longer pending before retention runs, so that it may prune it
                    self._queue.popleft()
                    self._pending.discard(step)
                if ok and self._on_uploaded is not None:
                    try:
                        self._on_uploaded(step)
                    except Exception as exc:  # retention trouble must not stop later uploads
                        warnings.warn(f"after uploading step {step}: {exc}", stacklevel=2)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, step: int, buf: memoryview) -> bool:
        src = self.source.join(self.source_root, self._name_of(step))
        try:
            copy_checkpoint(self.source, src, self.remote, self.remote_path(step), self.commit, buf)
            return True
        except Exception as exc:
            failure = UploadFailure(step, exc, time.time())
            with self._cond:
                self.failures.append(failure)
            warnings.warn(
                f"uploading {self.source.describe(src)} to {self.remote.describe(self.remote_path(step))} "
                f"failed: {exc!r}; the local copy is kept",
                stacklevel=2,
            )
            return False


__all__ = ["UploadFailure", "UploadPolicy", "Uploader", "copy_checkpoint", "copy_file"]
