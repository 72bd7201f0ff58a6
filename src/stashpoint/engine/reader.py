"""Reading a checkpoint of any supported format: :class:`CheckpointReader`.

One reader opens one checkpoint (ours, a PyTorch DCP checkpoint or an HF safetensors
directory, see :mod:`stashpoint.foreign`) and offers everything the engine reads from
it: the index, file checks, verified byte-range reads, whole tensors, decoded values
and iteration.  ``load``, ``load_full``/``iter_full``, merge inputs, conversions and
``verify`` all read through it.

Nothing is read from outside the checkpoint: every file name is checked
(:func:`stashpoint.foreign.member`), links out of the checkpoint are followed only
with ``follow_symlinks=True``, and a checkpoint deleted while it is read raises a
named error (:class:`~stashpoint.errors.CheckpointNotFoundError`,
:class:`~stashpoint.errors.DataFileMissingError`), never a bare ``OSError``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from stashpoint.engine.ranged import execute_read, read_in_pool
from stashpoint.engine.tensors import full_box
from stashpoint.errors import (
    CheckpointNotFoundError,
    DataFileMissingError,
    IncompleteCheckpointError,
    IndexCorruptError,
    MissingKeyError,
    PickleNotAllowedError,
    StashpointError,
    TruncatedDataError,
)
from stashpoint.foreign import TORCH_PICKLE, detect_format, foreign_index, member
from stashpoint.format.dtypes import dtype_from_name, itemsize
from stashpoint.format.index import (
    INDEX_FILE,
    ChunkRecord,
    FragmentRef,
    Index,
    Item,
    ObjectRecord,
    PerRankRecord,
    Record,
    TensorRecord,
    expand_index,
    iter_chunks,
)
from stashpoint.format.values import from_json
from stashpoint.planning.read_plan import ChunkRead, plan_chunk_reads
from stashpoint.storage import Storage, resolve
from stashpoint.vocab import CheckpointFormat, PerRankChoice

READ_THREADS = int(os.environ.get("STASHPOINT_READ_THREADS", "8"))


class CheckpointReader:
    """One checkpoint opened for reading; the index is read (and checked) once, here.

    ``verify`` checks every byte read against the recorded checksums (where the format
    has them); ``follow_symlinks`` allows files that are links to outside the checkpoint.
    """

    def __init__(
        self, storage: Storage, path: str, *, verify: bool = True, follow_symlinks: bool = False
    ) -> None:
        self.storage = storage
        self.path = path
        self.where = storage.describe(path)
        self.verify = verify
        self.follow_symlinks = follow_symlinks
        self._paths: dict[str, str] = {}
        self._expanded: Index | None = None
        with self.vanishing():
            #: the index as ``index.json`` has it: grid tensors list no chunks (format 3)
            self.format, self.main = self._open_index()
            for name in self.main.files:
                self.file_path(name)
        #: the chunks of grid tensors, from the fragments, each read once when first needed
        self.grid_chunks = self.main.grid_chunks(self._read_fragment, self.where)

    @property
    def index(self) -> Index:
        """The index with every chunk listed: for a format 3 index with grids, every
        fragment is read and checked once, here.  A load uses :attr:`main` and
        :attr:`grid_chunks` instead, and reads only the fragments it needs."""
        if self._expanded is None:
            with self.vanishing():
                self._expanded = expand_index(self.main, self._read_fragment, self.where)
        return self._expanded

    def _read_fragment(self, ref: FragmentRef) -> bytes:
        path = self.file_path(ref.fragment)
        with self.vanishing():
            try:
                size = self.storage.size(path)
            except FileNotFoundError:
                raise DataFileMissingError(
                    f"{self.where}: index fragment {ref.fragment!r} is missing"
                ) from None
            if size != ref.size:
                raise IndexCorruptError(
                    f"{self.where}: index fragment {ref.fragment!r} has {size} bytes, but "
                    f"'fragments[{ref.rank}].bytes' of the index says {ref.size}"
                )
            return self.storage.read_bytes(path)

    @classmethod
    def open(cls, location: str | os.PathLike, *, verify: bool = True, follow_symlinks: bool = False):
        """The reader of the checkpoint at a local path or storage URL."""
        storage, path = resolve(location)
        return cls(storage, path, verify=verify, follow_symlinks=follow_symlinks)

    def _open_index(self) -> tuple[CheckpointFormat, Index]:
        fmt = detect_format(self.storage, self.path)
        if fmt == "stashpoint":
            where = self.where
            index_path = member(
                self.storage, self.path, INDEX_FILE, what="index", follow_symlinks=self.follow_symlinks
            )
            try:
                text = self.storage.read_bytes(index_path)
            except FileNotFoundError:
                raise IncompleteCheckpointError(f"{where}: {INDEX_FILE} vanished while reading") from None
            return fmt, Index.from_json(text, where)
        index = (
            None
            if fmt is None
            else foreign_index(self.storage, self.path, fmt, follow_symlinks=self.follow_symlinks)
        )
        if index is not None:
            return fmt, index
        if fmt == "torch_save":
            raise IncompleteCheckpointError(
                f"{self.where} is a torch.save checkpoint, which is not read in place: import it "
                "with stashpoint.convert.import_torch_save (or `stashpoint convert`)"
            )
        if self.storage.exists(self.path):
            raise IncompleteCheckpointError(
                f"{self.where} has no {INDEX_FILE}: it was never committed (a save was interrupted "
                "or is still running)"
            )
        raise CheckpointNotFoundError(f"no checkpoint at {self.where}")

    @contextlib.contextmanager
    def vanishing(self) -> Iterator[None]:
        """Turn a file that disappears under us (a concurrent delete) into a named error."""
        try:
            yield
        except CheckpointNotFoundError:
            raise
        except (FileNotFoundError, NotADirectoryError) as exc:  # DataFileMissingError included
            if not self.storage.exists(self.path):
                raise CheckpointNotFoundError(f"{self.where} was deleted while it was being read") from None
            if isinstance(exc, StashpointError):
                raise
            name = getattr(exc, "filename", None) or "a file"
            raise DataFileMissingError(f"{self.where}: {name} vanished while it was being read") from None

    @property
    def crc_block(self) -> int | None:
        """Checksum block size when reads are verified, else None."""
        return self.main.crc_block_bytes if self.verify and self.main.crc_block_bytes else None

    def file_path(self, name: str) -> str:
        """The storage path of data file ``name``, checked to lie inside the checkpoint."""
        got = self._paths.get(name)
        if got is None:
            got = self._paths[name] = member(
                self.storage, self.path, name, what="data file", follow_symlinks=self.follow_symlinks
            )
        return got

    def check_files(self, files: Iterable[str] | None = None) -> None:
        """Every data file in ``files`` (default: all) exists and is long enough for its chunks.

        Without ``files`` the whole index is checked (every fragment is read); with them,
        the chunks ``index.json`` lists and those of the fragments used so far count.
        """
        if files is None:
            with self.vanishing():
                check_files(self.storage, self.path, self.index, set(self.index.files), self.file_path)
            return
        extra = [("", c) for c in self.grid_chunks.checked()]
        with self.vanishing():
            check_files(self.storage, self.path, self.main, set(files), self.file_path, extra)

    def read_chunk(self, fqn: str, read: ChunkRead, dest: torch.Tensor) -> int:
        """Read the runs of one chunk into ``dest`` (a CPU tensor); returns bytes read."""
        with self.vanishing():
            return execute_read(
                self.storage, self.file_path(read.chunk.file), self.where, fqn, read, dest, self.crc_block
            )

    def read_chunks(self, jobs: Sequence[tuple[str, ChunkRead, torch.Tensor]]) -> int:
        """Many chunk reads ``(fqn, read, dest)`` in parallel threads; returns bytes read."""
        if not jobs:
            return 0
        if len(jobs) == 1 or READ_THREADS <= 1:
            return sum(self.read_chunk(fqn, r, d) for fqn, r, d in jobs)
        with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
            futures = [pool.submit(self.read_chunk, fqn, r, d) for fqn, r, d in jobs]
            return sum(f.result() for f in futures)

    def read_per_tensor(
        self,
        reads: Mapping[str, Sequence[ChunkRead]],
        staged: dict[str, torch.Tensor],
        finish: Callable[[str, torch.Tensor], torch.Tensor],
        threads: int | None = None,
    ) -> int:
        """Read every tensor's chunks into ``staged[fqn]``, calling ``finish`` per finished tensor.

        See :func:`stashpoint.engine.ranged.read_in_pool`: as soon as the last read of a
        tensor is verified, ``staged[fqn] = finish(fqn, staged[fqn])``; returns bytes read.
        """

        def finish_one(fqn: str) -> None:
            staged[fqn] = finish(fqn, staged[fqn])

        return read_in_pool(
            lambda fqn, r: self.read_chunk(fqn, r, staged[fqn]),
            reads,
            finish_one,
            READ_THREADS if threads is None else threads,
        )

    def read_tensor(self, fqn: str, rec: TensorRecord | None = None) -> torch.Tensor:
        """One whole tensor, assembled from its chunks on the CPU."""
        rec = self._record(fqn) if rec is None else rec
        dtype = dtype_from_name(rec.dtype)
        out = torch.empty(rec.shape, dtype=dtype)
        reads = plan_chunk_reads(rec.chunks, full_box(tuple(rec.shape)), itemsize(dtype), self.crc_block)
        self.read_chunks([(fqn, r, out) for r in reads])
        return out

    def read_value(self, fqn: str, rec: ObjectRecord, *, allow_pickle: bool = False) -> object:
        """A plain value: inline JSON, or (only with ``allow_pickle``) unpickled bytes."""
        if rec.encoding == "json":
            return from_json(rec.value)
        if not allow_pickle:
            raise PickleNotAllowedError(_pickle_msg(self.where, fqn))
        data = self.read_tensor(fqn, TensorRecord(dtype="uint8", shape=rec.chunk.shape, chunks=(rec.chunk,)))
        raw = data.numpy().tobytes()
        if rec.encoding == TORCH_PICKLE:  # a DCP value (see stashpoint.foreign.dcp)
            return torch.load(io.BytesIO(raw), weights_only=False)
        return pickle.loads(raw)

    def read_record(self, fqn: str, rec: Record, *, allow_pickle: bool = False) -> object:
        if isinstance(rec, TensorRecord):
            return self.read_tensor(fqn, rec)
        return self.read_value(fqn, rec, allow_pickle=allow_pickle)

    def _record(self, fqn: str) -> TensorRecord:
        rec = self.main.items.get(fqn)
        if not isinstance(rec, TensorRecord):
            raise MissingKeyError(f"{self.where}: {fqn!r} is not a tensor of the checkpoint")
        return self.listed(fqn, rec)

    def listed(self, fqn: str, item: Item) -> Item:
        """``item`` with its chunks listed (from the fragments, when it has a grid)."""
        if isinstance(item, TensorRecord) and item.grid is not None:
            with self.vanishing():
                return self.grid_chunks.expanded(fqn, item)
        return item

    def items(
        self, names: Sequence[str] | None, *, per_rank: PerRankChoice, allow_pickle: bool
    ) -> Iterator[tuple[str, object]]:
        """``(name, value)`` of the named items (all by default), one at a time, in order.

        Per-rank items are left out (``"drop"``), given as rank 0's value (``"rank0"``)
        or as a list of every saved rank's value (``"all"``).  Every key, pickle and
        data file is checked before the first value is yielded.
        """
        names = sorted(self.main.items) if names is None else list(names)
        records: list[Record] = []
        listed: dict[str, Item] = {}
        for name in names:
            if name not in self.main.items:
                raise MissingKeyError(f"{self.where}: key {name!r} is not in the checkpoint")
            item = listed[name] = self.listed(name, self.main.items[name])
            recs = item.ranks if isinstance(item, PerRankRecord) else (item,)
            if not allow_pickle and any(isinstance(r, ObjectRecord) and r.pickled for r in recs):
                raise PickleNotAllowedError(_pickle_msg(self.where, name))
            records += recs
        self.check_files(files_of(records))
        for name in names:
            item = listed[name]
            if not isinstance(item, PerRankRecord):
                yield name, self.read_record(name, item, allow_pickle=allow_pickle)
            elif per_rank == "all":
                yield name, [self.read_record(name, r, allow_pickle=allow_pickle) for r in item.ranks]
            elif per_rank == "rank0":
                yield name, self.read_record(name, item.ranks[0], allow_pickle=allow_pickle)


def files_of(records: Iterable[Record]) -> set[str]:
    """The data files that hold the bytes of ``records``."""
    out: set[str] = set()
    for rec in records:
        if isinstance(rec, TensorRecord):
            out.update(c.file for c in rec.chunks)
        elif rec.chunk is not None:
            out.add(rec.chunk.file)
    return out


def read_index(storage: Storage, path: str, *, follow_symlinks: bool = False) -> Index:
    """The index of the checkpoint at ``path``, whatever its format."""
    return CheckpointReader(storage, path, follow_symlinks=follow_symlinks).index


def check_files(
    storage: Storage,
    path: str,
    index: Index,
    files: set[str],
    file_path: Callable[[str], str] | None = None,
    extra: Iterable[tuple[str, ChunkRecord]] = (),
) -> None:
    """Every data file in ``files`` exists and is long enough for every chunk in it
    (those ``index`` lists, and the ``extra`` (name, chunk) pairs)."""
    where = storage.describe(path)
    need: dict[str, tuple[int, str, str]] = {}
    for fqn, chunk in itertools.chain(iter_chunks(index), extra):
        if chunk.file in files and chunk.byte_range[1] > need.get(chunk.file, (0,))[0]:
            need[chunk.file] = (chunk.byte_range[1], fqn, chunk.key)
    for name in sorted(files):
        full = file_path(name) if file_path is not None else storage.join(path, name)
        try:
            size = storage.size(full)
        except FileNotFoundError:
            raise DataFileMissingError(f"{where}: data file {name!r} is missing") from None
        end, fqn, key = need.get(name, (0, "", ""))
        if size < end:
            raise TruncatedDataError(
                f"{where}: data file {name!r} has {size} bytes but chunk {key!r} of {fqn!r} "
                f"ends at byte {end}"
            )


def _pickle_msg(where: str, fqn: str) -> str:
    return (
        f"{where}: {fqn!r} is stored as pickle; pass allow_pickle=True only if you trust the "
        "checkpoint (unpickling can run arbitrary code)"
    )
