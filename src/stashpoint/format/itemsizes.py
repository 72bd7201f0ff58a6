"""Bytes per element of every dtype name the index may record, without importing torch.

The index is validated against these sizes (byte ranges are shape x itemsize long), so
that reading an index, as ``stashpoint inspect`` does, needs no torch.
:mod:`stashpoint.format.dtypes` maps the same names to torch dtypes; a test keeps the
two in step.
"""

from __future__ import annotations

ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
}
