"""Laying out a safetensors data file: header first, then chunk bytes back to back.

A safetensors file is an 8-byte little-endian header length, a JSON header that
maps each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to
the end of the header), then the data with no holes.  We know every chunk before
writing, so the header is computed up front and the data streamed after it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from stashpoint.format.dtypes import safetensors_code

_ALIGN = 8  # header is padded with spaces so that the data starts 8-byte aligned


@dataclass(frozen=True)
class FileEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class FileLayout:
    """The header bytes and each entry's absolute [start, end) range in the file."""

    header: bytes
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return self.ranges[-1][1] if self.ranges else len(self.header)


def layout_file(entries: list[FileEntry], metadata: dict[str, str] | None = None) -> FileLayout:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    rel: list[tuple[int, int]] = []
    for e in entries:
        code = safetensors_code(e.dtype)
        # dtypes safetensors cannot name are stored as flat bytes
        shape = list(e.shape) if code != "U8" or e.dtype == torch.uint8 else [e.nbytes]
        header[e.key] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + e.nbytes]}
        rel.append((pos, pos + e.nbytes))
        pos += e.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * ((-len(body) - 8) % _ALIGN)
    prefix = struct.pack("<Q", len(body)) + body
    base = len(prefix)
    return FileLayout(header=prefix, ranges=tuple((base + a, base + b) for a, b in rel))


def read_header(head: bytes) -> tuple[int, dict]:
    """Parse the header from the first bytes of a file; returns (data start, header).

    Raises ValueError, naming what is wrong, unless ``head`` holds a whole header whose
    entries (other than ``__metadata__``) each have ``data_offsets`` as two ordered ints.
    """
    if len(head) < 8:
        raise ValueError(f"the file has {len(head)} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + n:
        raise ValueError(f"the header claims {n} bytes but only {len(head) - 8} were read")
    try:
        header = json.loads(bytes(head[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1]:
            raise ValueError(f"entry {key[:80]!r} has no valid data_offsets")
    return 8 + n, header
