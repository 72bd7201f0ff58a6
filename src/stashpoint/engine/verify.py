"""Full verification of a committed checkpoint: index, files, headers, tiling, checksums."""

from __future__ import annotations

from dataclasses import dataclass, field

from stashpoint.engine.checksum import crc32c
from stashpoint.engine.reader import read_index
from stashpoint.errors import StashpointError
from stashpoint.format.index import Index, PerRankRecord, TensorRecord, iter_chunks
from stashpoint.format.safetensors_file import read_header
from stashpoint.storage import resolve

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


def verify_checkpoint(path: str) -> VerifyReport:
    """Check everything; collects every problem instead of stopping at the first.

    Raises only when the index itself cannot be read (nothing else can be checked).
    """
    storage, ckpt = resolve(path)
    index: Index = read_index(storage, ckpt)
    report = VerifyReport(path=storage.describe(ckpt), index_checksum=index.checksum_verified)
    for name, item in index.items.items():
        recs = item.ranks if isinstance(item, PerRankRecord) else (item,)
        for rec in recs:
            if isinstance(rec, TensorRecord) and not isinstance(item, PerRankRecord):
                report.problems += _tiling_problems(name, rec)
    if not index.crc_block_bytes:
        return _check_lengths(storage, ckpt, index, report)
    headers: dict[str, dict | None] = {}
    for name in index.files:
        try:
            head = storage.read_range(storage.join(ckpt, name), 0, 1 << 16)
            start, header = read_header(head)
            if start > len(head):
                start, header = read_header(storage.read_range(storage.join(ckpt, name), 0, start))
            headers[name] = {
                k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
                for k, v in header.items()
                if k != "__metadata__"
            }
        except FileNotFoundError:
            report.problems.append(f"data file {name!r} is missing")
            headers[name] = None
        except (ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"data file {name!r} has no valid safetensors header ({exc})")
            headers[name] = {}  # still check the chunks' bytes through the index
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
            _check_crc(storage, storage.join(ckpt, chunk.file), chunk, index.crc_block_bytes)
            report.bytes_checked += chunk.nbytes
        except StashpointError as exc:
            report.problems.append(f"{name!r}: {exc}")
    return report


def _check_lengths(storage, ckpt: str, index: Index, report: VerifyReport) -> VerifyReport:
    """Without checksums, all that can be checked is that every chunk's bytes are there."""
    report.checksums = False
    sizes: dict[str, int | None] = {}
    for name in index.files:
        try:
            sizes[name] = storage.size(storage.join(ckpt, name))
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
    from stashpoint.errors import ChecksumMismatchError, TruncatedDataError

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
