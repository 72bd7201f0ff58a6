"""CheckpointManager: periodic (async) saves, retention, and resume from the latest.

All ranks construct the manager and call :meth:`save` / :meth:`maybe_save` /
:meth:`load_latest` together (they are collectives).  Rank 0 alone lists,
deletes and cleans up, in a background thread; every rank sees the same
checkpoints because they are discovered through storage.

With ``upload_to``, the root is the fast tier and every committed checkpoint is
also uploaded to a remote tier in the background (see :mod:`.tiering`).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

from stashpoint.errors import StashpointError, StorageError
from stashpoint.manager.policy import RetentionPolicy, SavePolicy
from stashpoint.manager.tiering import Uploader, UploadFailure, UploadPolicy
from stashpoint.storage import LocalStorage, Storage, resolve
from stashpoint.storage.commit import PARTIAL_TAG

_NAME = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its URL, step and metrics, and the tier it was found in.

    ``tier`` is ``"local"`` for the manager's root and ``"remote"`` for the upload tier.
    """

    path: str
    step: int
    metrics: dict = field(default_factory=dict)
    tier: str = "local"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointManager:
    """Save every N steps and/or seconds, keep what the retention policy says.

    ``mode`` is ``"lazy"`` or ``"eager"`` (asynchronous saves, see
    :func:`stashpoint.async_save`) or ``"sync"``.  Metrics passed to :meth:`save`
    are stored in the checkpoint's metadata and drive ``keep_best``.

    ``upload_to`` (a URL, or an :class:`UploadPolicy`) makes ``root`` a fast tier:
    each committed checkpoint is uploaded there in the background; ``keep_local``
    checkpoints stay in ``root`` while ``retention`` applies to the remote tier.
    :meth:`latest` looks at both tiers.  Failed uploads are warned about, listed in
    :attr:`upload_failures` and raised by :meth:`wait` as ``UploadError``.
    """

    def __init__(
        self,
        root: str,
        *,
        save_policy: SavePolicy | None = None,
        retention: RetentionPolicy | None = None,
        mode: str = "lazy",
        if_busy: str = "wait",
        device_buffer: bool = False,
        process_group=None,
        timeout_s: float = 600.0,
        telemetry_path: str | None = None,
        stale_after_s: float | None = None,
        upload_to: str | UploadPolicy | None = None,
        keep_local: int | None = None,
    ) -> None:
        if mode not in ("lazy", "eager", "sync"):
            raise ValueError("mode must be 'lazy', 'eager' or 'sync'")
        from stashpoint._dist import Coordinator

        self.root = root
        self.storage, self._root = resolve(root)
        self.save_policy = save_policy or SavePolicy(every_steps=1000)
        self.retention = retention or RetentionPolicy()
        self.mode, self.if_busy, self.device_buffer = mode, if_busy, device_buffer
        self.process_group, self.timeout_s = process_group, timeout_s
        self._coord = Coordinator(process_group, timeout_s)
        # the default telemetry file sits next to a local root only: for object stores,
        # a path made from the root would land in the current directory
        local_root = isinstance(self.storage, LocalStorage)
        default_telemetry = self.storage.join(self._root, "telemetry.jsonl") if local_root else None
        self.telemetry_path = telemetry_path or default_telemetry
        self.upload = _upload_policy(upload_to, keep_local)
        self._uploader: Uploader | None = None
        self._remote: tuple[Storage, str] | None = None
        if self.upload is not None:
            self._remote = resolve(self.upload.remote)
        #: names of checkpoints this manager is writing: not committed yet, and not broken
        self._saving: set[str] = set()
        self._handles: list = []
        self._last_step: int | None = None
        self._last_time: float = time.monotonic()  # the seconds clock starts with the manager
        self._lock = threading.Lock()
        self._janitor: threading.Thread | None = None
        if mode != "sync":
            from stashpoint.engine.async_save import BackgroundWriter

            BackgroundWriter.get()  # start the writer process now, not at the first save
        if self._coord.is_coordinator:
            self.storage.make_prefix(self._root)
            stale_s = stale_after_s if stale_after_s is not None else timeout_s
            self._clean_stale(stale_s)
            self._abort_leaked_uploads(self.storage, self._root)
            if self.upload is not None:
                self._uploader = Uploader(
                    self.storage, self._root, self.upload, checkpoint_name, self._after_upload
                )
                try:
                    self._start_remote_tier(stale_s)
                except StorageError as exc:  # training goes on; uploads will report their own failures
                    warnings.warn(f"remote tier {self.upload.remote}: {exc}", stacklevel=2)

    # ------------------------------------------------------------------ discovery

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed, readable checkpoints, oldest first; broken ones are skipped with a warning.

        With a remote tier, both tiers are listed; a step held by both is reported once,
        from the local tier (faster to load).
        """
        found = {c.step: c for c in self._remote_checkpoints()}
        found.update({c.step: c for c in self._local_checkpoints()})
        return [found[s] for s in sorted(found)]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (in either tier) that passes the index and file checks."""
        found = self.checkpoints()
        return found[-1] if found else None

    @property
    def upload_failures(self) -> list[UploadFailure]:
        """Every failed upload so far (also warned about, and raised once by :meth:`wait`)."""
        return list(self._uploader.failures) if self._uploader is not None else []

    def _local_checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            quiet = set(self._saving)
        return _scan(self.storage, self._root, quiet, "local")

    def _remote_checkpoints(self) -> list[CheckpointInfo]:
        if self._remote is None:
            return []
        uploading = self._uploader.pending() if self._uploader is not None else set()
        remote, remote_root = self._remote
        try:
            return _scan(remote, remote_root, {checkpoint_name(s) for s in uploading}, "remote")
        except StorageError as exc:
            # an unreachable remote tier must not stop a resume from the local one; retention
            # then sees no remote copies, so it deletes nothing remote and keeps more locally
            warnings.warn(f"remote tier {self.upload.remote} not listed: {exc}", stacklevel=3)
            return []

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``; with a seconds policy, rank 0 decides for everyone."""
        due = self.save_policy.due(step, self._last_step, time.monotonic() - self._last_time)
        if self.save_policy.every_seconds is not None and self._coord.world_size > 1:
            due = self._coord.broadcast(due, "manager: save decision")
        return due

    def maybe_save(self, step: int, state: dict, metrics: dict | None = None):
        """Save if the save policy says so; every rank must get the same answer."""
        if not self.should_save(step):
            return None
        return self.save(step, state, metrics)

    def save(self, step: int, state: dict, metrics: dict | None = None):
        """Save now (a collective).  Returns a SaveHandle (async modes) or a SaveResult."""
        import stashpoint

        name = checkpoint_name(step)
        path = self.storage.url(self.storage.join(self._root, name))
        meta = {"metrics": dict(metrics or {})}
        self._last_step, self._last_time = step, time.monotonic()
        kwargs = dict(step=step, metadata=meta, overwrite=True, process_group=self.process_group)
        with self._lock:
            self._saving.add(name)
        if self.mode == "sync":
            try:
                result = stashpoint.save(state, path, timeout_s=self.timeout_s, **kwargs)
            finally:
                with self._lock:
                    self._saving.discard(name)
            self._record("save", step, result, stall_s=result.seconds)
            self._after_commit(step)
            return result
        try:
            handle = stashpoint.async_save(
                state,
                path,
                mode=self.mode,
                if_busy=self.if_busy,
                timeout_s=self.timeout_s,
                device_buffer=self.device_buffer,
                **kwargs,
            )
        except BaseException:
            with self._lock:
                self._saving.discard(name)
            raise
        if handle.skipped:
            with self._lock:
                self._saving.discard(name)
            return handle
        settled = threading.Event()  # set once the bookkeeping after the commit is done
        with self._lock:
            self._handles = [(h, e) for h, e in self._handles if not e.is_set()] + [(handle, settled)]

        def committed(_fut) -> None:
            try:
                with self._lock:
                    self._saving.discard(name)
                if handle.exception() is None:
                    self._record("save", step, handle.wait(), stall_s=handle.stall_s, mode=self.mode)
                    self._after_commit(step)
            finally:
                settled.set()

        handle._committed.add_done_callback(committed)
        return handle

    def warmup(self, state: dict) -> None:
        """Allocate and page-lock staging for ``state`` now, so the first save does not stall."""
        if self.mode != "sync":
            import stashpoint

            stashpoint.async_warmup(state, device_buffer=self.device_buffer)

    def load_latest(self, state: dict, **load_kwargs) -> CheckpointInfo | None:
        """Load the newest good checkpoint into ``state`` (a collective); None if there is none."""
        import stashpoint

        info = self._coord.broadcast(self.latest() if self._coord.is_coordinator else None, "manager: latest")
        if info is None:
            return None
        result = stashpoint.load(
            state, info.path, process_group=self.process_group, timeout_s=self.timeout_s, **load_kwargs
        )
        self._record("load", info.step, result)
        self._last_step, self._last_time = info.step, time.monotonic()
        return info

    def wait(self) -> None:
        """Wait for every save in flight to commit, then for uploads and deletions to finish.

        Raises ``UploadError`` once for uploads that failed since the last call.
        """
        with self._lock:
            handles = list(self._handles)
        for h, settled in handles:
            try:
                h.wait(self.timeout_s)
            finally:
                settled.wait(self.timeout_s)
        try:
            if self._uploader is not None:
                self._uploader.wait()
        finally:
            self._join_janitor()

    def _join_janitor(self) -> None:
        janitor = self._janitor
        if janitor is not None:
            janitor.join(self.timeout_s)

    def close(self) -> None:
        """:meth:`wait`, then stop the upload thread."""
        try:
            self.wait()
        finally:
            if self._uploader is not None:
                self._uploader.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ housekeeping

    def _after_commit(self, step: int) -> None:
        """A save of ``step`` committed: queue its upload, then apply retention."""
        if self._uploader is not None:
            self._uploader.submit(step)
        self._retain_in_background()

    def _after_upload(self, step: int) -> None:
        self._retain_in_background()

    def _start_remote_tier(self, stale_s: float) -> None:
        remote, remote_root = self._remote
        remote.make_prefix(remote_root)
        self._clean_stale(stale_s, remote, remote_root)  # uploads a crash interrupted
        self._abort_leaked_uploads(remote, remote_root)
        if self.upload.upload_existing:
            self._upload_missing()

    def _upload_missing(self) -> None:
        """Upload local checkpoints the remote tier lacks and retention still wants (oldest first)."""
        local, remote = self._local_checkpoints(), self._remote_checkpoints()
        wanted = self.retention.keep([(c.step, c.metrics) for c in local + remote])
        uploaded = {c.step for c in remote}
        for c in local:
            if c.step not in uploaded and c.step in wanted:
                self._uploader.submit(c.step)

    def _retain_in_background(self) -> None:
        if not self._coord.is_coordinator:
            return
        with self._lock:
            previous = self._janitor

            def run() -> None:
                if previous is not None:
                    previous.join()
                self._apply_retention()

            self._janitor = threading.Thread(target=run, daemon=True, name="stashpoint-retention")
            self._janitor.start()

    def _apply_retention(self) -> None:
        if self._remote is None:
            found = self._local_checkpoints()
            keep = self.retention.keep([(c.step, c.metrics) for c in found])
            for c in found:
                if c.step not in keep:
                    self._delete(self.storage, self._root, c.step)
            return
        local, remote = self._local_checkpoints(), self._remote_checkpoints()
        pending = self._uploader.pending() if self._uploader is not None else set()
        # remote tier: the retention policy, over what the remote tier holds
        remote_keep = self.retention.keep([(c.step, c.metrics) for c in remote])
        remote_storage, remote_root = self._remote
        for c in remote:
            if c.step not in remote_keep and c.step not in pending:
                self._delete(remote_storage, remote_root, c.step)
        # local tier: the newest ``keep_local``, plus any copy that is the only one the
        # policy still wants (upload pending or failed)
        steps = sorted(c.step for c in local)
        keep = set(steps if self.upload.keep_local is None else steps[len(steps) - self.upload.keep_local :])
        wanted = self.retention.keep([(c.step, c.metrics) for c in local + remote])
        uploaded = {c.step for c in remote if c.step in remote_keep}
        for c in local:
            if c.step in keep or c.step in pending or (c.step in wanted and c.step not in uploaded):
                continue
            self._delete(self.storage, self._root, c.step)

    def _delete(self, storage: Storage, root: str, step: int) -> None:
        path = storage.join(root, checkpoint_name(step))
        storage.delete(path)
        # a deleted checkpoint has no writer left: parts of uploads under it are leaked
        self._abort_uploads_under(storage, path)

    def _abort_leaked_uploads(self, storage: Storage, root: str) -> None:
        """Abort leaked multipart uploads under committed checkpoints (object stores only).

        Safe without an age limit: a checkpoint is only rewritten after its index was
        deleted, so no live writer has an upload under a committed one.  Leaks under
        checkpoints that never committed are left to a bucket lifecycle rule, since a
        writer may still own them (see docs/STORAGE.md).
        """
        if not storage.multipart_uploads:
            return
        for info in _scan(storage, root, set(), "", warn=False):
            self._abort_uploads_under(storage, storage.join(root, checkpoint_name(info.step)))

    @staticmethod
    def _abort_uploads_under(storage: Storage, path: str) -> None:
        try:
            storage.abort_incomplete_uploads(path.rstrip("/") + "/")
        except StorageError as exc:  # housekeeping: never fail a save or a start for it
            warnings.warn(
                f"could not abort leftover uploads under {storage.describe(path)}: {exc}", stacklevel=2
            )

    def _clean_stale(
        self, older_than_s: float, storage: Storage | None = None, root: str | None = None
    ) -> None:
        """Remove partial saves left by crashed runs (old enough that no writer still owns them)."""
        import os

        storage = storage or self.storage
        root = root if root is not None else self._root
        for name in storage.list(root):
            if not name.startswith(".") or (PARTIAL_TAG not in name and ".old-" not in name):
                continue
            path = storage.join(root, name)
            try:
                age = time.time() - os.path.getmtime(path)
            except OSError:
                age = older_than_s  # not a local path: rely on the name alone
            if age >= older_than_s:
                storage.delete(path)

    def _record(self, kind: str, step: int, result, **extra) -> None:
        if not self._coord.is_coordinator or result is None or self.telemetry_path is None:
            return
        from stashpoint.engine.telemetry import append_record

        append_record(self.telemetry_path, kind, result, step=step, **extra)


def _scan(storage: Storage, root: str, quiet: set[str], tier: str, warn: bool = True) -> list[CheckpointInfo]:
    """Committed, readable checkpoints under ``root``, oldest first.

    Broken ones are skipped with a warning, except those named in ``quiet``: saves or
    uploads still being written, which look uncommitted until their index lands.
    """
    from stashpoint.engine.reader import check_files, read_index

    out = []
    for name in storage.list(root):
        m = _NAME.match(name)
        if not m:
            continue
        path = storage.join(root, name)
        try:
            index = read_index(storage, path)
            check_files(storage, path, index, set(index.files))
        except StashpointError as exc:
            if warn and name not in quiet:
                warnings.warn(f"skipping {storage.describe(path)}: {exc}", stacklevel=3)
            continue
        user = index.metadata.user
        metrics = user.get("metrics", {}) if isinstance(user, dict) else {}
        step = index.metadata.step if index.metadata.step is not None else int(m.group(1))
        out.append(
            CheckpointInfo(storage.url(path), step, metrics if isinstance(metrics, dict) else {}, tier)
        )
    out.sort(key=lambda c: c.step)
    return out


def _upload_policy(upload_to: str | UploadPolicy | None, keep_local: int | None) -> UploadPolicy | None:
    if upload_to is None:
        if keep_local is not None:
            raise ValueError("keep_local needs upload_to (a remote tier to keep the rest)")
        return None
    if isinstance(upload_to, UploadPolicy):
        return upload_to if keep_local is None else dataclasses.replace(upload_to, keep_local=keep_local)
    return (
        UploadPolicy(remote=str(upload_to))
        if keep_local is None
        else UploadPolicy(str(upload_to), keep_local)
    )
