"""A manager's durable tiers: its root and, with an upload policy, the remote tier.

:class:`Tiers` owns where committed checkpoints live once saved and what is kept of
them: it lists both tiers, hands each committed checkpoint to the
:class:`~stashpoint.manager.tiering.Uploader`, and applies the retention policy in a
background thread (the janitor).  The manager decides when to save and what to load;
it tells this class when a save starts, ends and commits.  Kept apart from
``manager.py`` because none of this depends on saving or loading state.

Every rank holds one (any rank may list).  Rank 0 alone calls :meth:`Tiers.start`
(cleaning up, then uploading) and is the only one that prunes.
"""

from __future__ import annotations

import threading
import warnings

from stashpoint.errors import StorageError
from stashpoint.manager.config import ManagerConfig
from stashpoint.manager.housekeeping import (
    CheckpointInfo,
    abort_leaked_uploads,
    checkpoint_name,
    clean_leftovers,
    delete_checkpoint,
    scan_checkpoints,
)
from stashpoint.manager.tiering import Uploader, UploadFailure
from stashpoint.storage import Storage, resolve


class Tiers:
    """The local root ``root`` of ``storage``, and the remote tier of ``config.upload``.

    ``coordinator``: whether this rank is the one that uploads and prunes.
    """

    def __init__(self, storage: Storage, root: str, config: ManagerConfig, *, coordinator: bool) -> None:
        self.storage, self.root = storage, root
        self.retention, self.upload = config.retention, config.upload
        self.stale_s, self.timeout_s = config.stale_s, config.timeout_s
        self.coordinator = coordinator
        self.remote: tuple[Storage, str] | None = None
        if self.upload is not None:
            self.remote = resolve(self.upload.remote)
        self.uploader: Uploader | None = None
        #: names of checkpoints this manager is writing: not committed yet, and not broken
        self._saving: set[str] = set()
        self._janitor: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Rank 0: clean up after crashed runs, then start uploading (with a remote tier)."""
        self.storage.make_prefix(self.root)
        clean_leftovers(self.storage, self.root, self.stale_s)
        abort_leaked_uploads(self.storage, self.root)
        if self.upload is not None:
            self.uploader = Uploader(
                self.storage, self.root, self.upload, checkpoint_name, self._after_upload
            )
            try:
                self._start_remote()
            except StorageError as exc:  # training goes on; uploads will report their own failures
                warnings.warn(f"remote tier {self.upload.remote}: {exc}", stacklevel=3)

    def _start_remote(self) -> None:
        remote, remote_root = self.remote
        remote.make_prefix(remote_root)
        clean_leftovers(remote, remote_root, self.stale_s)  # uploads a crash interrupted
        abort_leaked_uploads(remote, remote_root)
        if self.upload.upload_existing:
            self._upload_missing()

    # ------------------------------------------------------------------ saves in flight

    def saving(self, name: str) -> None:
        """A save of ``name`` started: until it ends, its listing failures are not warned about."""
        with self._lock:
            self._saving.add(name)

    def done_saving(self, name: str) -> None:
        with self._lock:
            self._saving.discard(name)

    # ------------------------------------------------------------------ listing

    def local_checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            quiet = frozenset(self._saving)
        return scan_checkpoints(self.storage, self.root, tier="local", quiet=quiet)

    def remote_checkpoints(self) -> list[CheckpointInfo]:
        """The remote tier's checkpoints; none (with a warning) when it cannot be listed."""
        if self.remote is None:
            return []
        remote, remote_root = self.remote
        quiet = frozenset(checkpoint_name(s) for s in self._pending())
        try:
            return scan_checkpoints(remote, remote_root, tier="remote", quiet=quiet)
        except StorageError as exc:
            # an unreachable remote tier must not stop a resume from the local one; retention
            # then sees no remote copies, so it deletes nothing remote and keeps more locally
            warnings.warn(f"remote tier {self.upload.remote} not listed: {exc}", stacklevel=3)
            return []

    def upload_failures(self) -> list[UploadFailure]:
        return list(self.uploader.failures) if self.uploader is not None else []

    def _pending(self) -> set[int]:
        return self.uploader.pending() if self.uploader is not None else set()

    # ------------------------------------------------------------------ after a commit

    def after_commit(self, step: int) -> None:
        """A save of ``step`` committed: queue its upload, then apply retention."""
        if self.uploader is not None:
            self.uploader.submit(step)
        self._retain_in_background()

    def _after_upload(self, step: int) -> None:
        self._retain_in_background()

    def _upload_missing(self) -> None:
        """Upload local checkpoints the remote tier lacks and retention still wants (oldest first)."""
        local, remote = self.local_checkpoints(), self.remote_checkpoints()
        wanted = self.retention.keep([(c.step, c.metrics) for c in local + remote])
        uploaded = {c.step for c in remote}
        for c in local:
            if c.step not in uploaded and c.step in wanted:
                self.uploader.submit(c.step)

    def _retain_in_background(self) -> None:
        if not self.coordinator:
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
        """Delete what the policy does not keep, by the names the checkpoints were listed under."""
        if self.remote is None:
            found = self.local_checkpoints()
            keep = self.retention.keep([(c.step, c.metrics) for c in found])
            for c in found:
                if c.step not in keep:
                    delete_checkpoint(self.storage, self.root, c.name)
            return
        local, remote = self.local_checkpoints(), self.remote_checkpoints()
        pending = self._pending()
        # remote tier: the retention policy, over what the remote tier holds
        remote_keep = self.retention.keep([(c.step, c.metrics) for c in remote])
        remote_storage, remote_root = self.remote
        for c in remote:
            if c.step not in remote_keep and c.step not in pending:
                delete_checkpoint(remote_storage, remote_root, c.name)
        # local tier: the newest ``keep_local``, plus any copy that is the only one the
        # policy still wants (upload pending or failed)
        steps = sorted(c.step for c in local)
        keep = set(steps if self.upload.keep_local is None else steps[len(steps) - self.upload.keep_local :])
        wanted = self.retention.keep([(c.step, c.metrics) for c in local + remote])
        uploaded = {c.step for c in remote if c.step in remote_keep}
        for c in local:
            if c.step in keep or c.step in pending or (c.step in wanted and c.step not in uploaded):
                continue
            delete_checkpoint(self.storage, self.root, c.name)

    # ------------------------------------------------------------------ waiting

    def wait(self) -> None:
        """Wait for uploads (raising ``UploadError`` for failed ones), then for deletions."""
        try:
            if self.uploader is not None:
                self.uploader.wait()
        finally:
            janitor = self._janitor
            if janitor is not None:
                janitor.join(self.timeout_s)

    def close(self) -> None:
        """Stop the upload thread."""
        if self.uploader is not None:
            self.uploader.close()
