"""CheckpointManager: periodic (async) saves, retention, and resume from the latest.

All ranks construct the manager and call :meth:`save` / :meth:`maybe_save` /
:meth:`load_latest` together (they are collectives).  Rank 0 alone lists,
deletes and cleans up, in a background thread; every rank sees the same
checkpoints because they are discovered through storage.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from dataclasses import dataclass, field

from stashpoint.errors import StashpointError
from stashpoint.manager.policy import RetentionPolicy, SavePolicy
from stashpoint.storage import resolve
from stashpoint.storage.commit import PARTIAL_TAG

_NAME = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    step: int
    metrics: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointManager:
    """Save every N steps and/or seconds, keep what the retention policy says.

    ``mode`` is ``"lazy"`` or ``"eager"`` (asynchronous saves, see
    :func:`stashpoint.async_save`) or ``"sync"``.  Metrics passed to :meth:`save`
    are stored in the checkpoint's metadata and drive ``keep_best``.
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
        local_root = not self.storage.describe(self._root).startswith("memory://")
        default_telemetry = self.storage.join(self._root, "telemetry.jsonl") if local_root else None
        self.telemetry_path = telemetry_path or default_telemetry
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
            self._clean_stale(stale_after_s if stale_after_s is not None else timeout_s)

    # ------------------------------------------------------------------ discovery

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed, readable checkpoints, oldest first; broken ones are skipped with a warning."""
        from stashpoint.engine.reader import check_files, read_index

        out = []
        for name in self.storage.list(self._root):
            m = _NAME.match(name)
            if not m:
                continue
            path = self.storage.join(self._root, name)
            try:
                index = read_index(self.storage, path)
                check_files(self.storage, path, index, set(index.files))
            except StashpointError as exc:
                warnings.warn(f"skipping {self.storage.describe(path)}: {exc}", stacklevel=2)
                continue
            metrics = index.metadata.user.get("metrics", {}) if isinstance(index.metadata.user, dict) else {}
            step = index.metadata.step if index.metadata.step is not None else int(m.group(1))
            out.append(
                CheckpointInfo(self._describe(path), step, metrics if isinstance(metrics, dict) else {})
            )
        out.sort(key=lambda c: c.step)
        return out

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint that passes the index and file checks."""
        found = self.checkpoints()
        return found[-1] if found else None

    def _describe(self, path: str) -> str:
        return self.storage.url(path)

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

        path = self.storage.url(self.storage.join(self._root, checkpoint_name(step)))
        meta = {"metrics": dict(metrics or {})}
        self._last_step, self._last_time = step, time.monotonic()
        kwargs = dict(step=step, metadata=meta, overwrite=True, process_group=self.process_group)
        if self.mode == "sync":
            result = stashpoint.save(state, path, timeout_s=self.timeout_s, **kwargs)
            self._record("save", step, result, stall_s=result.seconds)
            self._retain_in_background()
            return result
        handle = stashpoint.async_save(
            state,
            path,
            mode=self.mode,
            if_busy=self.if_busy,
            timeout_s=self.timeout_s,
            device_buffer=self.device_buffer,
            **kwargs,
        )
        if handle.skipped:
            return handle
        settled = threading.Event()  # set once the bookkeeping after the commit is done
        with self._lock:
            self._handles = [(h, e) for h, e in self._handles if not e.is_set()] + [(handle, settled)]

        def committed(_fut) -> None:
            try:
                if handle.exception() is None:
                    self._record("save", step, handle.wait(), stall_s=handle.stall_s, mode=self.mode)
                    self._retain_in_background()
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
        """Wait for every save in flight to commit, then for deletions to finish."""
        with self._lock:
            handles = list(self._handles)
        for h, settled in handles:
            try:
                h.wait()
            finally:
                settled.wait()
        janitor = self._janitor
        if janitor is not None:
            janitor.join()

    def close(self) -> None:
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ housekeeping

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
        found = self.checkpoints()
        keep = self.retention.keep([(c.step, c.metrics) for c in found])
        for c in found:
            if c.step not in keep:
                self.storage.delete(self.storage.join(self._root, checkpoint_name(c.step)))

    def _clean_stale(self, older_than_s: float) -> None:
        """Remove partial saves left by crashed runs (old enough that no writer still owns them)."""
        import os

        for name in self.storage.list(self._root):
            if not name.startswith(".") or (PARTIAL_TAG not in name and ".old-" not in name):
                continue
            path = self.storage.join(self._root, name)
            try:
                age = time.time() - os.path.getmtime(path)
            except OSError:
                age = older_than_s  # not a local path: rely on the name alone
            if age >= older_than_s:
                self.storage.delete(path)

    def _record(self, kind: str, step: int, result, **extra) -> None:
        if not self._coord.is_coordinator or result is None or self.telemetry_path is None:
            return
        from stashpoint.engine.telemetry import append_record

        append_record(self.telemetry_path, kind, result, step=step, **extra)
