"""``stashpoint inspect PATH [--json]``: what a checkpoint holds, read from its index alone.

Our own checkpoints are inspected without importing torch (only the JSON index is
read); PyTorch DCP and HF directories are described through the engine's reader, which
needs it.  A path that holds no checkpoint is told apart from an interrupted save.
"""

from __future__ import annotations

import datetime
import json

from stashpoint.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    NotACheckpointError,
    StashpointError,
)
from stashpoint.format.index import (
    INDEX_FILE,
    Index,
    ObjectRecord,
    PerRankRecord,
    TensorRecord,
    layout_to_json,
)
from stashpoint.planning.name_match import KeyDiff, checkpoint_names, diff_keys
from stashpoint.storage import Storage, resolve
from stashpoint.storage.commit import PARTIAL_TAG
from stashpoint.textfmt import human_bytes, table

#: what inspect shows for a date or version the checkpoint does not record (DCP, HF)
UNKNOWN = "unknown"


def _describe(name: str, item) -> dict:
    if isinstance(item, PerRankRecord):
        first = item.ranks[0]
        kind = "tensor" if isinstance(first, TensorRecord) else "object"
        return {
            "name": name,
            "kind": f"per-rank {kind}",
            "dtype": first.dtype if isinstance(first, TensorRecord) else first.encoding,
            "shape": list(first.shape) if isinstance(first, TensorRecord) else None,
            "layout": f"{len(item.ranks)} ranks",
            "chunks": len(item.ranks),
            "bytes": item.nbytes,
        }
    if isinstance(item, TensorRecord):
        layout = "whole"
        if item.layout is not None:
            mesh = "x".join(map(str, item.layout.mesh_shape))
            layout = f"{','.join(item.layout.placements)} on {mesh}"
        return {
            "name": name,
            "kind": "tensor",
            "dtype": item.dtype,
            "shape": list(item.shape),
            "layout": layout,
            "chunks": len(item.chunks),
            "bytes": item.nbytes,
        }
    assert isinstance(item, ObjectRecord)
    preview = json.dumps(item.value) if item.encoding == "json" else "<pickle>"
    return {
        "name": name,
        "kind": "object",
        "dtype": item.encoding,
        "shape": None,
        "layout": preview if len(preview) <= 40 else preview[:37] + "...",
        "chunks": 1 if item.chunk else 0,
        "bytes": item.nbytes,
    }


def _created(unix: float) -> str | None:
    """ISO time of a save; None when not recorded (other tools' checkpoints record 0)."""
    if unix <= 0:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat()


def summarize(index: Index) -> dict:
    """The checkpoint as a JSON-able dict; what the index does not record is None."""
    rows = [_describe(n, it) for n, it in sorted(index.items.items())]
    m = index.metadata
    return {
        "format_version": index.format_version,
        "index_checksum": index.checksum_verified,
        "metadata": {
            "step": m.step,
            "world_size": m.world_size,
            "created": _created(m.created_unix),
            "torch_version": m.torch_version or None,
            "stashpoint_version": m.stashpoint_version or None,
            "user": m.user,
            "layouts": [layout_to_json(n) for n in m.layouts],
        },
        "items": rows,
        "totals": {
            "items": len(rows),
            "tensors": sum(1 for r in rows if "tensor" in r["kind"]),
            "bytes": index.total_bytes,
            "files": len(index.files),
        },
    }


def open_index(location: str) -> Index:
    """The index of the checkpoint at ``location``, or a named error saying what is there."""
    storage, path = resolve(location)
    index_path = storage.join(path, INDEX_FILE)
    if storage.exists(index_path):
        return Index.from_json(storage.read_bytes(index_path), storage.describe(path))
    from stashpoint.engine.reader import read_index  # DCP and HF directories: read with torch

    try:
        return read_index(storage, path)
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        raise no_checkpoint(storage, path) from None


def no_checkpoint(storage: Storage, path: str) -> StashpointError:
    """Why ``path`` holds no committed checkpoint: nothing there, an interrupted save (its
    hidden ``.NAME.partial-*`` staging, or data files without an index), or something else."""
    where = storage.describe(path)
    name = storage.basename(path)
    staging = [n for n in storage.list(storage.parent(path)) if n.startswith(f".{name}{PARTIAL_TAG}")]
    interrupted = "a save was interrupted or is still running"
    if staging:
        return IncompleteCheckpointError(
            f"{where} has no committed checkpoint: {interrupted} (its files are in {staging[0]})"
        )
    if not storage.exists(path):
        return CheckpointNotFoundError(f"no checkpoint at {where}")
    if not storage.is_prefix(path):
        return NotACheckpointError(f"{where} is a file, not a checkpoint directory")
    if any(n.endswith(".safetensors") for n in storage.list(path)):
        return IncompleteCheckpointError(f"{where} has data files but no {INDEX_FILE}: {interrupted}")
    return NotACheckpointError(
        f"{where} is not a checkpoint: it holds no {INDEX_FILE}, DCP .metadata or HF safetensors files"
    )


def names_diff(index: Index, other: Index) -> KeyDiff:
    """What reading ``index`` under ``other``'s names (as a load would) leaves missing,
    finds unexpected, or renames; ``other``'s top-level names are the target's."""
    prefixes = sorted({n.split(".", 1)[0] for n in other.items})
    renames = checkpoint_names(index.items.keys(), other.items.keys(), prefixes)
    return diff_keys(index.items.keys(), other.items.keys(), prefixes, renames)


def run(path: str, as_json: bool = False, against: str | None = None) -> int:
    index = open_index(path)
    summary = summarize(index)
    diff = None if against is None else names_diff(index, open_index(against))
    if diff is not None:
        summary["names_against"] = {
            "checkpoint": against,
            "missing": list(diff.missing),
            "unexpected": list(diff.unexpected),
            "renamed": [list(pair) for pair in diff.renamed],
        }
    if as_json:
        print(json.dumps(summary, indent=1))
        return 0
    rows = [
        [
            r["name"],
            r["kind"],
            r["dtype"],
            "" if r["shape"] is None else "x".join(map(str, r["shape"])) or "scalar",
            r["layout"],
            str(r["chunks"]),
            human_bytes(r["bytes"]),
        ]
        for r in summary["items"]
    ]
    print(table(["name", "kind", "dtype", "shape", "layout at save", "chunks", "bytes"], rows, right={5, 6}))
    t, m = summary["totals"], summary["metadata"]
    print()
    print(
        f"{t['items']} items ({t['tensors']} tensors), {human_bytes(t['bytes'])} in {t['files']} data files; "
        f"format v{summary['format_version']}"
        + ("" if summary["index_checksum"] else " (index unverified: it records no checksum)")
    )
    step = UNKNOWN if m["step"] is None else m["step"]
    print(
        f"step {step}, saved {m['created'] or UNKNOWN} by {m['world_size']} ranks "
        f"(torch {m['torch_version'] or UNKNOWN}, stashpoint {m['stashpoint_version'] or UNKNOWN})"
    )
    if m["user"]:
        print(f"metadata: {json.dumps(m['user'])}")
    for n in m["layouts"]:
        ids = n["global_ids"]
        print(
            f"rank {n['rank']} saved {n['prefix']}.{n['key']} entries 0-{len(ids) - 1} as {ids} ({n['kind']})"
        )
    if diff is not None:
        print(f"names against {against}:")
        print(diff.summary())
    return 0
