"""The on-disk format: safetensors data files plus one JSON index (see docs/FORMAT.md)."""

from stashpoint.format.index import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    ChunkRecord,
    Index,
    ObjectRecord,
    SaveMetadata,
    TensorRecord,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "ChunkRecord",
    "Index",
    "ObjectRecord",
    "SaveMetadata",
    "TensorRecord",
]
