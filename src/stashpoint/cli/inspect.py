"""``stashpoint inspect PATH [--json]``: what a checkpoint holds, read from its index alone."""

from __future__ import annotations

import datetime
import json

from stashpoint.cli.format import human_bytes, table
from stashpoint.format.index import Index, ObjectRecord, PerRankRecord, TensorRecord


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


def summarize(index: Index) -> dict:
    rows = [_describe(n, it) for n, it in sorted(index.items.items())]
    m = index.metadata
    return {
        "format_version": index.format_version,
        "index_checksum": index.checksum_verified,
        "metadata": {
            "step": m.step,
            "world_size": m.world_size,
            "created": datetime.datetime.fromtimestamp(m.created_unix, datetime.timezone.utc).isoformat(),
            "torch_version": m.torch_version,
            "stashpoint_version": m.stashpoint_version,
            "user": m.user,
        },
        "items": rows,
        "totals": {
            "items": len(rows),
            "tensors": sum(1 for r in rows if "tensor" in r["kind"]),
            "bytes": index.total_bytes,
            "files": len(index.files),
        },
    }


def run(path: str, as_json: bool = False) -> int:
    from stashpoint import read_index

    summary = summarize(read_index(path))
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
    print(
        f"step {m['step']}, saved {m['created']} by {m['world_size']} ranks "
        f"(torch {m['torch_version']}, stashpoint {m['stashpoint_version']})"
    )
    if m["user"]:
        print(f"metadata: {json.dumps(m['user'])}")
    return 0
