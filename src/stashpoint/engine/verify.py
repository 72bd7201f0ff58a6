"""Full verification of a committed checkpoint: index, files, headers, tiling, checksums."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from stashpoint.engine.checksum import crc32c
from stashpoint.engine.reader import CheckpointReader
from stashpoint.errors import ChecksumMismatchError, StashpointError, TruncatedDataError
from stashpoint.format.index import TensorRecord, iter_chunks
from stashpoint.format.safetensors_file import read_header

_READ_BLOCK = 16 << 20


@dataclass
class VerifyReport:
    path: str
    chunks: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: False for other tools' checkpoints read in place (DCP, HF), which record no checksums
    checksums: bool = True
    #: the index's own checksum matched (False: a format version 1 index, which has none)
    index_checksum: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _tiling_problems(name: str, rec: TensorRecord) -> list[str]:
    numel = 1
    for n in rec.shape:
        numel *= n
    covered = 0
    for c in rec.chunks:
        k = 1
        for n in c.shape:
            k *= n
        covered += k
    boxes = [(c.offsets, c.shape) for c in rec.chunks]
    for i, (ao, ash) in enumerate(boxes):
        for bo, bsh in boxes[i + 1 :]:
            if all(max(a, b) < min(a + s, b + t) for a, s, b, t in zip(ao, ash, bo, bsh)):
                return [f"{name!r}: chunks at {list(ao)} and {list(bo)} overlap"]
    if covered != numel:
        return [f"{name!r}: chunks cover {covered} of {numel} elements"]
    return []


def verify_checkpoint(path: str, *, follow_symlinks: bool = False) -> VerifyReport:
    """Check everything; collects every problem instead of stopping at the first.

    Raises only when the index itself cannot be read (nothing else can be checked),
    or names files outside the checkpoint.
    """
    reader = CheckpointReader.open(path, follow_symlinks=follow_symlinks)
    index = reader.index
    report = VerifyReport(path=reader.where, index_checksum=index.checksum_verified)
    for name, item in index.items.items():
        if isinstance(item, TensorRecord):
            report.problems += _tiling_problems(name, item)
    if not index.crc_block_bytes:
        return _check_lengths(reader, report)
    headers = {name: _file_ranges(reader, name, report) for name in index.files}
    for name, chunk in iter_chunks(index):
        ranges = headers.get(chunk.file)
        if ranges is None:
            continue
        report.chunks += 1
        if ranges and ranges.get(chunk.key) != tuple(chunk.byte_range):
            report.problems.append(
                f"{name!r}: chunk {chunk.key!r} is not at bytes {list(chunk.byte_range)} of {chunk.file!r}"
            )
            continue
        try:
            with reader.vanishing():
                _check_crc(reader.storage, reader.file_path(chunk.file), chunk, index.crc_block_bytes)
            report.bytes_checked += chunk.nbytes
        except StashpointError as exc:
            report.problems.append(f"{name!r}: {exc}")
    return report


def _file_ranges(reader: CheckpointReader, name: str, report: VerifyReport) -> dict | None:
    """``key -> (start, end)`` from a data file's whole safetensors header.

    None when the file is missing; empty (the chunks are still checked through the
    index) when its header is unreadable.  A file longer than its last chunk is a
    problem too: the format says a data file ends there.
    """
    storage, fpath = reader.storage, reader.file_path(name)
    try:
        size = storage.size(fpath)
        head = storage.read_range(fpath, 0, 8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            report.problems.append(f"data file {name!r} is too short for its safetensors header")
            return {}
        start, header = read_header(head + storage.read_range(fpath, 8, 8 + n))
        ranges = {
            k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__"
        }
    except FileNotFoundError:
        report.problems.append(f"data file {name!r} is missing")
        return None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
        report.problems.append(f"data file {name!r} has no valid safetensors header ({exc})")
        return {}
    end = max((e for _, e in ranges.values()), default=start)
    if size > end:
        report.problems.append(f"data file {name!r} has {size - end} bytes after its last chunk")
    return ranges


def _check_lengths(reader: CheckpointReader, report: VerifyReport) -> VerifyReport:
    """Without checksums, all that can be checked is that every chunk's bytes are there."""
    report.checksums = False
    index = reader.index
    sizes: dict[str, int | None] = {}
    for name in index.files:
        try:
            sizes[name] = reader.storage.size(reader.file_path(name))
        except FileNotFoundError:
            report.problems.append(f"data file {name!r} is missing")
            sizes[name] = None
    for name, chunk in iter_chunks(index):
        size = sizes.get(chunk.file)
        if size is None:
            continue
        report.chunks += 1
        if size < chunk.byte_range[1]:
            report.problems.append(f"{name!r}: {chunk.file!r} ends before byte {chunk.byte_range[1]}")
    return report


def _check_crc(storage, file_path: str, chunk, block: int) -> None:
    start, end = chunk.byte_range
    step = max(block, _READ_BLOCK // block * block)
    for pos in range(start, end, step):
        data = storage.read_range(file_path, pos, min(pos + step, end))
        if len(data) < min(step, end - pos):
            raise TruncatedDataError(f"chunk {chunk.key!r} of {chunk.file!r} is truncated")
        for i in range(0, len(data), block):
            b = (pos - start + i) // block
            if crc32c(data[i : i + block]) != chunk.crc32c[b]:
                raise ChecksumMismatchError(
                    f"checksum mismatch in chunk {chunk.key!r} of {chunk.file!r} at byte {pos + i}"
                )
