"""The one way a checkpoint of ours appears: prepare, write data files, finish, or abort.

Every writer of stashpoint checkpoints goes through a :class:`Publisher`: the sync
save, the background writer process, imports and conversions, merge output and
tier uploads.  Its life:

1. :meth:`Publisher.prepare` (the coordinator, before any rank writes): refuse an
   existing checkpoint without ``overwrite``, or make room for it; the commit
   strategy decides what that takes, callers never ask it;
2. :meth:`Publisher.write_file` (every rank): one data file into the staging
   location named by the token all ranks agreed on;
3. :meth:`Publisher.finish` (the coordinator): the index from every rank's records,
   written last, then the commit: the checkpoint appears whole;
4. :meth:`Publisher.abort` after a failure anywhere: nothing becomes visible and the
   previous checkpoint at the path, if any, is untouched.

Ranks that cannot talk over a process group (the writer processes of an async save)
exchange their records through the staging location (:meth:`Publisher.deliver`,
:meth:`Publisher.collect`, :meth:`Publisher.wait_committed`).

:class:`StreamedCheckpoint` wraps a publisher for one process writing items one at
a time (imports, merges); :func:`staged_directory` gives other tools' formats
(HF and DCP exports) the same staged-then-atomic publication.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from stashpoint._version import __version__
from stashpoint.engine.persist import (
    DISK_FULL_ERRNOS,
    WRITE_THREADS,
    build_index,
    data_file_name,
    fragment_chunks,
    named_write_errors,
    write_data_file,
    write_error,
)
from stashpoint.engine.records import (
    Chunk,
    Contribution,
    EncodedValue,
    FileItem,
    Inline,
    Written,
    contribution_from_json,
    contribution_to_json,
)
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.errors import CoordinationError, RemoteRankError, StashpointError
from stashpoint.format.dtypes import dtype_name, itemsize
from stashpoint.format.fragment import fragment_bytes, fragment_ref
from stashpoint.format.grid import TensorGrid
from stashpoint.format.index import (
    DEFAULT_CRC_BLOCK_BYTES,
    FORMAT_VERSION,
    INDEX_FILE,
    Index,
    NameLayout,
    SaveMetadata,
)
from stashpoint.planning.save_plan import GLOBAL, ItemPlan
from stashpoint.storage import LocalStorage, Storage, resolve
from stashpoint.storage.commit import AtomicRenameCommit, CommitStrategy, default_commit

MANIFEST_PREFIX = ".manifest-"
POLL_S = 0.02


def new_token() -> str:
    """A fresh save id; it also names the staging location."""
    return uuid.uuid4().hex[:12]


def save_metadata(
    world_size: int, step: int | None, user: dict, save_id: str = "", layouts: tuple[NameLayout, ...] = ()
) -> SaveMetadata:
    return SaveMetadata(
        layouts=layouts,
        save_id=save_id,
        world_size=world_size,
        created_unix=time.time(),
        torch_version=torch.__version__,
        stashpoint_version=__version__,
        step=step,
        user=user,
    )


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:05d}.json"


class Publisher:
    """One checkpoint on its way to ``final``; cheap to build, the same on every rank."""

    def __init__(
        self,
        storage: Storage,
        final: str,
        *,
        token: str,
        overwrite: bool,
        commit: CommitStrategy | None = None,
    ) -> None:
        self.storage, self.final, self.token, self.overwrite = storage, final, token, overwrite
        self.commit = commit or default_commit(storage)
        self.staging = self.commit.staging_path(storage, final, token)
        self.where = storage.describe(final)

    def prepare(self) -> None:
        """The coordinator, before any rank writes: refuse or make room (see the commit strategy)."""
        self.commit.prepare(self.storage, self.final, self.overwrite)

    def write_file(
        self,
        rank: int,
        items: list[FileItem],
        crc_block: int,
        timer: PhaseTimer,
        threads: int = WRITE_THREADS,
    ) -> tuple[list[Written], int]:
        """This rank's data file, durably, in the staging location; returns records and size."""
        with named_write_errors(self.where, self.staging):
            self.storage.make_prefix(self.staging)
        return write_data_file(
            self.storage, self.staging, data_file_name(rank), items, crc_block, timer, threads, self.where
        )

    def write_fragment(
        self, rank: int, written: list[Written], grids: Mapping[str, TensorGrid]
    ) -> list[Contribution]:
        """Put this rank's chunks of grid tensors into its index fragment, in the staging location.

        Returns what the rank still contributes to ``index.json`` itself: its other
        chunks, and the fragment's name and digest (docs/FORMAT.md §3.4).
        """
        into, rest = fragment_chunks(written, grids)
        if not into:
            return list(rest)
        file = into[0].record.file
        raw = fragment_bytes(file, self.token, FORMAT_VERSION, [(w.fqn, w.record) for w in into])
        ref = fragment_ref(rank, file, raw)
        with named_write_errors(self.where, ref.fragment):
            self.storage.write_bytes(self.storage.join(self.staging, ref.fragment), raw)
        return [*rest, ref]

    def finish(
        self,
        plan_items: dict[str, ItemPlan],
        contributions: list[list[Contribution]],
        metadata: SaveMetadata,
        crc_block: int,
        timer: PhaseTimer,
        grids: Mapping[str, TensorGrid] | None = None,
    ) -> Index:
        """The coordinator: build the index from every rank's records, write it, commit."""
        try:
            index = build_index(plan_items, contributions, metadata, crc_block, grids)
        except BaseException:
            self.abort()
            raise
        self.finish_with(index.to_json().encode(), timer)
        return index

    def finish_with(self, index_bytes: bytes, timer: PhaseTimer | None = None) -> None:
        """Write the given index bytes last and commit (a copy of a committed checkpoint)."""
        timer = timer or PhaseTimer()
        try:
            with timer.phase("commit"):
                with named_write_errors(self.where, INDEX_FILE):
                    self.storage.write_bytes(self.storage.join(self.staging, INDEX_FILE), index_bytes)
                    self.storage.sync_prefix(self.staging)
                self.commit.commit(self.storage, self.staging, self.final, self.overwrite)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove what this save left behind; never raises (the original error matters)."""
        try:
            self.commit.abort(self.storage, self.staging, self.final)
        except Exception as exc:  # leftovers are uncommitted: no reader takes them for a checkpoint
            warnings.warn(f"cleaning up after a failed save to {self.where}: {exc}", stacklevel=2)

    # -- ranks that share only storage (writer processes) -----------------------------------

    def deliver(self, rank: int, contributions: list[Contribution]) -> None:
        """A rank's records, for the coordinator's :meth:`collect`."""
        doc = json.dumps([contribution_to_json(c) for c in contributions]).encode()
        self._write_manifest(rank, doc)

    def report_failure(self, rank: int, exc: BaseException) -> None:
        """Tell the coordinator (through storage) that this rank cannot deliver."""
        try:
            self._write_manifest(rank, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        except Exception:  # storage itself may be what failed; the coordinator then times out
            pass

    def collect(self, world_size: int, timeout_s: float) -> list[list[Contribution]]:
        """The coordinator: every rank's records, in rank order (manifests are removed)."""
        deadline = time.monotonic() + timeout_s
        out = [self._wait_manifest(rank, deadline, timeout_s) for rank in range(world_size)]
        for rank in range(world_size):
            self.storage.delete(self.storage.join(self.staging, manifest_name(rank)))
        return out

    def wait_committed(self, timeout_s: float) -> None:
        """A non-coordinator rank: block until the index of this save (by token) is committed."""
        deadline = time.monotonic() + timeout_s
        while not self._committed():
            if self.staging != self.final and not self.storage.exists(self.staging):
                # staging vanished without our index appearing: the save was aborted
                time.sleep(POLL_S * 5)
                if not self._committed():
                    raise RemoteRankError(f"{self.where}: the save was aborted by another rank")
                return
            if time.monotonic() > deadline:
                raise CoordinationError(f"{self.where}: not committed within {timeout_s:g}s")
            time.sleep(POLL_S)

    def _committed(self) -> bool:
        try:
            raw = self.storage.read_bytes(self.storage.join(self.final, INDEX_FILE))
            return Index.from_json(raw, self.where).metadata.save_id == self.token
        except Exception:  # missing, or being replaced right now: not (yet) ours
            return False

    def _read_manifest(self, name: str) -> object | None:
        """A delivered manifest, or None while it is absent or still being written."""
        if not self.storage.exists(name):
            return None
        try:
            return json.loads(self.storage.read_bytes(name))
        except (FileNotFoundError, ValueError):
            return None

    def _write_manifest(self, rank: int, doc: bytes) -> None:
        with named_write_errors(self.where, manifest_name(rank)):
            self.storage.write_bytes(self.storage.join(self.staging, manifest_name(rank)), doc)

    def _wait_manifest(self, rank: int, deadline: float, timeout_s: float) -> list[Contribution]:
        name = self.storage.join(self.staging, manifest_name(rank))
        while True:
            # a manifest being written may be seen empty or cut short: wait for all of it
            doc = self._read_manifest(name)
            if doc is not None:
                break
            if time.monotonic() > deadline:
                raise CoordinationError(
                    f"{self.where}: rank {rank} did not deliver its data within {timeout_s:g}s"
                )
            time.sleep(POLL_S)
        if isinstance(doc, dict) and "error" in doc:
            raise RemoteRankError(f"{self.where}: rank {rank} failed to write its data: {doc['error']}")
        return [contribution_from_json(d) for d in doc]


class StreamedCheckpoint:
    """A checkpoint one process writes item by item: imports, conversions, merge output.

    Tensors are fetched only when the writer reaches them (one thread, one at a time),
    so peak memory is about one tensor.  :meth:`publish` prepares, writes, finishes,
    or aborts: an existing checkpoint at ``path`` is refused without ``overwrite``.
    """

    def __init__(
        self, path: str | os.PathLike, *, overwrite: bool, step: int | None = None, user: dict
    ) -> None:
        storage, final = resolve(path)
        self.publisher = Publisher(storage, final, token=new_token(), overwrite=overwrite)
        self.metadata = save_metadata(1, step, user)
        self._items: list[FileItem] = []
        self._inline: list[Inline] = []
        self._plan: dict[str, ItemPlan] = {}

    def add_tensor(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], fetch: Callable[[], memoryview]
    ) -> None:
        """A whole tensor; ``fetch()`` returns its bytes when they are due."""
        numel = 1
        for n in shape:
            numel *= n
        chunk = Chunk(
            fqn=name,
            per_rank=False,
            key=name,
            dtype=dtype_name(dtype),
            shape=tuple(shape),
            offsets=(0,) * len(shape),
            nbytes=numel * itemsize(dtype),
        )
        self._items.append(FileItem(chunk=chunk, fetch=fetch))
        self._plan[name] = ItemPlan(
            fqn=name,
            is_tensor=True,
            scope=GLOBAL,
            dtype=chunk.dtype,
            shape=chunk.shape,
            layout=None,
            encoding="",
        )

    def add_value(self, name: str, value: EncodedValue) -> None:
        """A non-tensor value: JSON goes into the index, pickle bytes into the data file."""
        self._plan[name] = ItemPlan(
            fqn=name, is_tensor=False, scope=GLOBAL, dtype="", shape=(), layout=None, encoding=value.encoding
        )
        if value.inline:
            self._inline.append(Inline(fqn=name, per_rank=False, json_text=value.payload.decode()))
            return
        payload = value.payload
        n = len(payload)
        chunk = Chunk(fqn=name, per_rank=False, key=name, dtype="", shape=(n,), offsets=(0,), nbytes=n)
        self._items.append(FileItem(chunk=chunk, fetch=lambda: memoryview(payload)))

    @property
    def file_count(self) -> int:
        return 1 if self._items else 0

    def publish(self) -> int:
        """Write the data file and the index and commit; returns the data file's size."""
        pub, timer = self.publisher, PhaseTimer()
        pub.prepare()
        try:
            # one thread: each item is fetched (computed) and written before the next,
            # which is what bounds memory
            written, size = pub.write_file(0, self._items, DEFAULT_CRC_BLOCK_BYTES, timer, threads=1)
        except BaseException:
            pub.abort()
            raise
        pub.finish(self._plan, [[*written, *self._inline]], self.metadata, DEFAULT_CRC_BLOCK_BYTES, timer)
        return size


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


@contextmanager
def staged_directory(dst: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
    """Publish a local directory written in other tools' formats (HF, DCP exports) atomically.

    Yields a hidden sibling to write into; when the body returns it is made durable and
    swapped in at once, so readers see the old directory or the new one, never a mix.
    An existing destination is refused with :class:`~stashpoint.errors.CheckpointExistsError`
    unless ``overwrite`` (an existing *empty* directory is simply replaced).  On any
    failure the staging is removed and the destination is untouched.
    """
    storage, commit = LocalStorage(), AtomicRenameCommit()
    final = os.path.abspath(os.fspath(dst))
    replace = overwrite or _is_empty_dir(final)
    commit.prepare(storage, final, replace)
    staging = commit.staging_path(storage, final, new_token())
    try:
        os.makedirs(staging)
        yield staging
        storage.sync_prefix(staging)
        commit.commit(storage, staging, final, replace)
    except BaseException as exc:
        try:
            commit.abort(storage, staging, final)
        except OSError:
            pass
        if (
            isinstance(exc, OSError)
            and not isinstance(exc, StashpointError)
            and exc.errno in DISK_FULL_ERRNOS
        ):
            raise write_error(final, staging, exc) from exc
        raise
