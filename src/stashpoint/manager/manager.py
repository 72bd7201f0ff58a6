"""CheckpointManager: periodic (async) saves, retention, and resume from the latest.

All ranks construct the manager and call :meth:`save` / :meth:`maybe_save` /
:meth:`load_latest` together (they are collectives).  Rank 0 alone lists,
deletes and cleans up, in a background thread; every rank sees the same
checkpoints because they are discovered through storage.

With an upload policy, the root is the fast tier and every committed checkpoint is
also uploaded to a remote tier in the background (see :mod:`.tiering`).

This module is the public class: when to save and snapshot, and how to resume.
Listing the tiers, queueing uploads and applying retention live in :mod:`.tiers`;
one resume attempt (load, or skip a damaged checkpoint) in :mod:`.resume`; cleaning
what crashed runs left in :mod:`.housekeeping`.
"""

from __future__ import annotations

import os
import threading
import time

import torch.distributed as dist

from stashpoint._dist import Coordinator
from stashpoint.engine.async_save import BackgroundWriter, SaveHandle, async_save_state, warmup
from stashpoint.engine.save import save_state
from stashpoint.engine.snapshot import SnapshotHandle
from stashpoint.engine.telemetry import LoadResult, SaveResult, append_record
from stashpoint.errors import InvalidOptionError
from stashpoint.manager.config import ManagerConfig, manager_config
from stashpoint.manager.housekeeping import CheckpointInfo, checkpoint_name, reclaim_staging
from stashpoint.manager.memory import MemoryPolicy, MemoryTier, Preemption, Recovered
from stashpoint.manager.resume import load_or_skip
from stashpoint.manager.tiering import UploadFailure
from stashpoint.manager.tiers import Tiers
from stashpoint.storage import LocalStorage, resolve


class CheckpointManager:
    """Save every N steps and/or seconds, keep what the retention policy says.

    Options come as a :class:`ManagerConfig` or as keyword arguments naming its fields
    (``save_policy``, ``retention``, ``mode``, ``if_busy``, ``device_buffer``,
    ``timeout_s``, ``telemetry_path``, ``stale_after_s``, ``upload``), which replace
    the config's.  ``upload_to`` (a URL, or an :class:`UploadPolicy`) and
    ``keep_local`` are a shorter way to give ``upload``.  Metrics passed to
    :meth:`save` are stored in the checkpoint's metadata and drive ``keep_best``.

    With a remote tier, ``root`` is a fast tier: each committed checkpoint is uploaded
    in the background; ``keep_local`` checkpoints stay in ``root`` while ``retention``
    applies to the remote tier.  :meth:`latest` looks at both tiers.  Failed uploads are
    warned about, listed in :attr:`upload_failures` and raised by :meth:`wait` as
    ``UploadError``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: ManagerConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **options: object,
    ) -> None:
        self.config = manager_config(config, options)
        self.root = os.fspath(root)
        self.storage, self._root = resolve(self.root)
        self.save_policy, self.retention = self.config.save_policy, self.config.retention
        self.mode, self.timeout_s, self.upload = self.config.mode, self.config.timeout_s, self.config.upload
        self.process_group = process_group
        self._coord = Coordinator(process_group, self.timeout_s)
        # the default telemetry file sits next to a local root only: for object stores,
        # a path made from the root would land in the current directory
        local_root = isinstance(self.storage, LocalStorage)
        default_telemetry = self.storage.join(self._root, "telemetry.jsonl") if local_root else None
        self.telemetry_path = self.config.telemetry_path or default_telemetry
        self._tiers = Tiers(self.storage, self._root, self.config, coordinator=self._coord.is_coordinator)
        self._handles: list[tuple[SaveHandle, threading.Event]] = []
        self._last_step: int | None = None
        self._last_time: float = time.monotonic()  # the seconds clock starts with the manager
        self._lock = threading.Lock()
        self._memory: MemoryTier | None = None
        self._preemption: Preemption | None = None
        self.recovered: Recovered | None = None
        if self.config.memory is not None:
            self._start_memory_tier(self.config.memory)
        reclaim_staging()
        if self.mode != "sync" and self._memory is None:
            BackgroundWriter.get()  # start the writer process now, not at the first save
        if self._coord.is_coordinator:
            self._tiers.start()

    @property
    def memory_root(self) -> str | None:
        """This node's directory of the job's memory tier (None without one)."""
        return None if self._memory is None else self._memory.root

    def _start_memory_tier(self, policy: MemoryPolicy) -> None:
        url = self.storage.url(self._root)
        self._memory = MemoryTier(policy, url, self._coord, self.process_group)
        if policy.signal is not None:
            snaps = self._memory.snapshots
            grace = policy.grace_s
            self._preemption = Preemption(policy.signal, notify=lambda: snaps.notify_preempted(grace))

    # ------------------------------------------------------------------ discovery

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed, readable checkpoints, oldest first; broken ones are skipped with a warning.

        With a remote tier, both tiers are listed; a step held by both is reported once,
        from the local tier (faster to load).
        """
        found = {c.step: c for c in self._tiers.remote_checkpoints()}
        found.update({c.step: c for c in self._tiers.local_checkpoints()})
        return [found[s] for s in sorted(found)]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (in either tier) that passes the index and file checks."""
        found = self.checkpoints()
        return found[-1] if found else None

    @property
    def upload_failures(self) -> list[UploadFailure]:
        """Every failed upload so far (also warned about, and raised once by :meth:`wait`)."""
        return self._tiers.upload_failures()

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``; with a seconds policy, rank 0 decides for everyone."""
        due = self.save_policy.due(step, self._last_step, time.monotonic() - self._last_time)
        if self.save_policy.every_seconds is not None and self._coord.world_size > 1:
            due = self._coord.broadcast(due, "manager: save decision")
        return due

    def maybe_save(
        self, step: int, state: dict, metrics: dict | None = None
    ) -> SaveHandle | SaveResult | SnapshotHandle | None:
        """Snapshot and/or save as the policies say; every rank must get the same answer.

        With a memory tier, a durable save due at a step is written from that step's
        memory snapshot (no second copy from the device).  Returns the durable save's
        handle, else the snapshot's, else None.
        """
        snap = None
        durable = self.should_save(step)
        if self._memory is not None and (durable or self._memory.due(step)):
            snap = self.snapshot(step, state, metrics, durable=durable)
        if not durable:
            return snap
        return self.save(step, state, metrics)

    def snapshot(
        self, step: int, state: dict, metrics: dict | None = None, *, durable: bool = False
    ) -> SnapshotHandle | None:
        """A memory snapshot now (a collective); None when every rank skipped it (slots busy)."""
        if self._memory is None:
            raise InvalidOptionError(
                "snapshot() needs a memory tier: CheckpointManager(..., memory=MemoryPolicy())"
            )
        mode = "eager" if self.mode == "sync" else self.mode
        return self._memory.snapshot(
            state,
            step,
            durable=durable,
            mode=mode,
            device_buffer=self.config.device_buffer,
            metadata={"metrics": dict(metrics or {})},
        )

    def save(self, step: int, state: dict, metrics: dict | None = None) -> SaveHandle | SaveResult:
        """Save now (a collective).  Returns a SaveHandle (async modes) or a SaveResult."""
        name = checkpoint_name(step)
        path = self.storage.url(self.storage.join(self._root, name))
        meta = {"metrics": dict(metrics or {})}
        common = dict(
            step=step,
            metadata=meta,
            overwrite=True,
            process_group=self.process_group,
            timeout_s=self.timeout_s,
        )
        self._last_step, self._last_time = step, time.monotonic()
        self._tiers.saving(name)
        snap = self._memory.last if self._memory is not None else None
        if snap is not None and snap.step == step:
            futures = self._memory.snapshots.persist(snap, path)
            return self._track(SaveHandle.following(path, self._coord, futures, mode="memory"), name, step)
        if self.mode == "sync":
            try:
                result = save_state(state, path, **common)
            finally:
                self._tiers.done_saving(name)
            self._record("save", step, result, stall_s=result.seconds)
            self._tiers.after_commit(step)
            return result
        try:
            handle = async_save_state(
                state,
                path,
                mode=self.mode,
                if_busy=self.config.if_busy,
                device_buffer=self.config.device_buffer,
                **common,
            )
        except BaseException:
            self._tiers.done_saving(name)
            raise
        if handle.skipped:
            self._tiers.done_saving(name)
            return handle
        return self._track(handle, name, step)

    def _track(self, handle: SaveHandle, name: str, step: int) -> SaveHandle:
        """Book-keeping once ``handle`` commits: telemetry, upload, retention."""
        settled = threading.Event()  # set once the bookkeeping after the commit is done
        with self._lock:
            self._handles = [(h, e) for h, e in self._handles if not e.is_set()] + [(handle, settled)]

        def committed(done: SaveHandle) -> None:
            try:
                self._tiers.done_saving(name)
                if done.exception() is None:
                    self._record("save", step, done.wait(), stall_s=done.stall_s, mode=done.mode)
                    self._tiers.after_commit(step)
            finally:
                settled.set()

        handle.add_done_callback(committed)
        return handle

    def preempted(self, step: int, state: dict) -> bool:
        """At a safe point (every rank, each step): True when the job was told to stop.

        The preemption signal (``MemoryPolicy.signal``) only sets a flag; here all ranks
        agree on it (a small collective), the state of ``step`` is saved durably from a
        memory snapshot within the grace period, and one line says what was saved.  The
        caller then leaves the training loop.  Should the trainer never get here, its
        keeper persists the newest snapshot on its own when the grace period runs out.
        """
        if self._preemption is None or not self._preemption.agreed(self._coord):
            return False
        grace = self.config.memory.grace_s
        t0 = time.monotonic()
        handle = self.save(step, state)
        if isinstance(handle, SaveHandle):
            handle.wait(grace)
        self.wait()
        if self._coord.is_coordinator:
            print(
                f"stashpoint: {self._preemption.signame} received; saved step {step} to "
                f"{self.storage.url(self.storage.join(self._root, checkpoint_name(step)))} "
                f"in {time.monotonic() - t0:.2f}s",
                flush=True,
            )
        return True

    def warmup(self, state: dict) -> None:
        """Allocate and page-lock staging (or every memory slot) for ``state`` now, so the
        first saves do not stall; a collective with a memory tier."""
        if self._memory is not None:
            self._memory.warmup(state, self.config.device_buffer)
        elif self.mode != "sync":
            warmup(state, device_buffer=self.config.device_buffer)

    # ------------------------------------------------------------------ resuming

    def load_latest(self, state: dict, **load_kwargs: object) -> CheckpointInfo | None:
        """Load the newest good checkpoint into ``state`` (a collective); None if there is none.

        A checkpoint that turns out damaged while loading (checksum, truncation, missing
        file, corrupt index) or that is deleted under the load is skipped with a warning
        naming what was wrong, and the previous one is loaded: a failed load changes
        nothing.  Errors about the target (a missing key, another shape) are raised.

        With a memory tier the tiers are tried in order: the newest memory snapshot
        every rank's node holds whole (when it is not older than the newest durable
        checkpoint), then durable storage.  The returned info's ``tier`` says which
        (``"memory"``: :attr:`recovered` has the details).
        """
        if self._memory is not None:
            info = self._recover_from_memory(state, load_kwargs)
            if info is not None:
                return info
        tried: set[str] = set()
        deadline = time.monotonic() + self.timeout_s
        while True:
            # rank 0 lists (again, once every candidate failed: newer ones may have been
            # committed meanwhile) and decides for everyone, the deadline included
            mine = None
            if self._coord.is_coordinator and time.monotonic() < deadline:
                mine = self._candidates(tried)
            candidates = self._coord.broadcast(mine, "manager: latest")
            if not candidates:
                return None
            for info in candidates:
                tried.add(info.path)
                result = load_or_skip(
                    state,
                    info.path,
                    self._coord,
                    load_kwargs,
                    process_group=self.process_group,
                    timeout_s=self.timeout_s,
                )
                if result is not None:
                    self._record("load", info.step, result)
                    self._last_step, self._last_time = info.step, time.monotonic()
                    return info

    def _recover_from_memory(self, state: dict, load_kwargs: dict) -> CheckpointInfo | None:
        newest = self.latest() if self._coord.is_coordinator else None
        durable_step = self._coord.broadcast(None if newest is None else newest.step, "manager: latest step")
        got = self._memory.recover(state, durable_step, load_kwargs)
        if got is None:
            return None
        self.recovered = got
        self._record("load", got.step, got.result, tier="memory")
        # the durable interval counts from the last durable checkpoint, not from the snapshot
        self._last_step, self._last_time = durable_step, time.monotonic()
        return CheckpointInfo(path=got.path, step=got.step, tier="memory", name=f"memory:{got.step}")

    def _candidates(self, tried: set[str]) -> list[CheckpointInfo]:
        """Checkpoints not tried yet, newest first."""
        return [c for c in reversed(self.checkpoints()) if c.path not in tried]

    # ------------------------------------------------------------------ waiting

    def wait(self) -> None:
        """Wait for every save in flight to commit, then for uploads and deletions to finish.

        Raises ``UploadError`` once for uploads that failed since the last call.
        """
        if self._memory is not None:
            self._memory.wait()
        with self._lock:
            handles = list(self._handles)
        for h, settled in handles:
            try:
                h.wait(self.timeout_s)
            finally:
                settled.wait(self.timeout_s)
        self._tiers.wait()

    def close(self, *, release_memory: bool = True) -> None:
        """:meth:`wait`, then stop the upload thread and free the memory tier.

        ``release_memory=False`` leaves the snapshots with their keepers, for a
        trainer that is restarted (they persist at the breakpoint if none comes).
        """
        try:
            self.wait()
        finally:
            self._tiers.close()
            if self._memory is not None:
                self._memory.close(release=release_memory)
            if self._preemption is not None:
                self._preemption.restore()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ telemetry

    def _record(self, kind: str, step: int, result: SaveResult | LoadResult | None, **extra: object) -> None:
        if not self._coord.is_coordinator or result is None or self.telemetry_path is None:
            return
        append_record(self.telemetry_path, kind, result, step=step, **extra)


__all__ = ["CheckpointInfo", "CheckpointManager", "ManagerConfig", "checkpoint_name"]
