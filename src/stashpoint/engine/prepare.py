"""The first, collective step of every save: inventory, exchange, plan.

Every rank flattens its state, describes what it holds, and the inventories are
exchanged over gloo; every rank then computes the same save plan.  Used by the
synchronous and the asynchronous save alike.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.persist import FileItem
from stashpoint.engine.tensors import as_bytes, dtensor_boxes, dtensor_layout, full_box, local_tensor, region
from stashpoint.errors import CheckpointExistsError, InvalidStateError, StashpointError
from stashpoint.format.dtypes import dtype_name, is_supported, itemsize
from stashpoint.format.index import INDEX_FILE
from stashpoint.format.safetensors_file import FileEntry
from stashpoint.planning.save_plan import LocalItem, SavePlan, WriteItem, build_save_plan
from stashpoint.storage import Storage
from stashpoint.storage.commit import CommitStrategy

#: what a rank writes from: its local tensor, or an encoded object (encoding, bytes)
Source = torch.Tensor | tuple[str, bytes]


@dataclass
class PreparedSave:
    plan: SavePlan
    token: str  # agreed by all ranks: names the staging location and the save
    staging: str
    sources: dict[str, Source]
    flat: _state.FlatState


def describe(leaf: _state.Leaf, allow_pickle: bool = False) -> tuple[LocalItem, Source]:
    """A leaf's inventory entry and the source this rank would write from."""
    v = leaf.value
    if isinstance(v, torch.Tensor):
        if not is_supported(v.dtype):
            raise InvalidStateError(f"{leaf.fqn!r}: dtype {v.dtype} is not supported")
        if isinstance(v, DTensor) and leaf.scope != _state.PER_RANK:
            boxes, layout = dtensor_boxes(leaf.fqn, v), dtensor_layout(v)
        else:
            boxes, layout = full_box(tuple(v.shape)), None
        local = local_tensor(v).detach()
        if leaf.scope == _state.PER_RANK:
            v = local
            boxes = full_box(tuple(local.shape))
        digest = None
        if leaf.scope == _state.CHECKED:
            digest = crc32c(as_bytes(local.cpu().contiguous()))
        item = LocalItem(
            fqn=leaf.fqn,
            is_tensor=True,
            scope=leaf.scope,
            dtype=dtype_name(v.dtype),
            shape=tuple(v.shape),
            itemsize=itemsize(v.dtype),
            boxes=tuple(boxes),
            digest=digest,
            layout=layout,
        )
        return item, local
    encoding, payload = _state.encode_object(v, leaf.fqn, allow_pickle)
    item = LocalItem(
        fqn=leaf.fqn,
        is_tensor=False,
        scope=leaf.scope,
        digest=crc32c(payload),
        encoding=encoding,
        payload_bytes=len(payload),
    )
    return item, (encoding, payload)


def prepare_save(
    state: dict,
    coord: Coordinator,
    storage: Storage,
    final: str,
    commit: CommitStrategy,
    overwrite: bool,
    allow_pickle: bool = False,
) -> PreparedSave:
    """Collective: every rank calls it; returns the same plan and staging path everywhere."""
    where = storage.describe(final)
    token = uuid.uuid4().hex[:12]
    def inventory() -> tuple[list[LocalItem], str, dict[str, Source], _state.FlatState]:
        try:
            if coord.is_coordinator and storage.exists(final):
                if not overwrite:
                    raise CheckpointExistsError(f"{where} already exists; pass overwrite=True to replace it")
                if commit.staging_path(storage, final, "x") == final:
                    # writing in place: drop the old index first so no reader mixes the two
                    storage.delete(storage.join(final, INDEX_FILE))
                    storage.delete(final)
            flat = _state.flatten_state(state)
            described = {fqn: describe(leaf, allow_pickle) for fqn, leaf in flat.leaves.items()}
        except StashpointError as exc:
            if where not in str(exc):  # every message names the checkpoint
                raise type(exc)(f"{where}: {exc}") from exc
            raise
        sources = {f: d[1] for f, d in described.items()}
        return [d[0] for d in described.values()], token, sources, flat

    agreed = coord.run_everywhere("save: exchange inventories", inventory, share=lambda r: (r[0], r[1]))
    plan = build_save_plan([g[0] for g in agreed.everyone])
    token = agreed.everyone[0][1]
    staging = commit.staging_path(storage, final, token)
    _, _, sources, flat = agreed.mine
    return PreparedSave(plan=plan, token=token, staging=staging, sources=sources, flat=flat)


def file_items(plan: SavePlan, writes: tuple[WriteItem, ...], sources: dict[str, Source]) -> list[FileItem]:
    """What goes into this rank's data file, fetching bytes straight from the sources."""
    items = []
    for w in writes:
        src = sources[w.fqn]
        if isinstance(src, torch.Tensor):
            box = w.box
            entry = FileEntry(w.file_key, src.dtype, box.shape, box.numel * src.element_size())

            def fetch(src=src, box=box) -> memoryview:
                return as_bytes(region(src, box.local_offsets, box.shape).to("cpu").contiguous())

            items.append(FileItem(w.fqn, w.per_rank, entry, dtype_name(src.dtype), tuple(box.offsets), fetch))
        elif src[0] != "json":
            payload = src[1]
            entry = FileEntry(w.file_key, torch.uint8, (len(payload),), len(payload))
            items.append(FileItem(w.fqn, w.per_rank, entry, "", (0,), lambda p=payload: memoryview(p)))
    return items


def inline_values(writes: tuple[WriteItem, ...], sources: dict[str, Source]):
    """The JSON values this rank contributes to the index (they are not in data files)."""
    from stashpoint.engine.persist import Written

    out = []
    for w in writes:
        src = sources[w.fqn]
        if not isinstance(src, torch.Tensor) and src[0] == "json":
            out.append(Written(w.fqn, w.per_rank, json_text=src[1].decode()))
    return out
