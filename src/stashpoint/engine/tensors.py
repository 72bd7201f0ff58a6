"""Small helpers shared by the save and load engines."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

from stashpoint.engine.checksum import crc32c
from stashpoint.errors import InvalidStateError
from stashpoint.format.index import Layout
from stashpoint.planning.layout import REPLICATE, Box, PlacementSpec, local_boxes


def placement_specs(fqn: str, dt: DTensor) -> tuple[PlacementSpec, ...]:
    specs = []
    for p in dt.placements:
        if isinstance(p, _StridedShard):
            specs.append(PlacementSpec("strided", p.dim, int(p.split_factor)))
        elif isinstance(p, Shard):
            specs.append(PlacementSpec("shard", p.dim))
        elif isinstance(p, Replicate):
            specs.append(REPLICATE)
        elif isinstance(p, Partial):
            raise InvalidStateError(
                f"{fqn!r} has a Partial placement (pending reduction); redistribute it "
                "to Shard or Replicate before saving"
            )
        else:
            raise InvalidStateError(f"{fqn!r}: placement {p!r} is not supported")
    return tuple(specs)


def dtensor_boxes(fqn: str, dt: DTensor) -> list[Box]:
    """The global boxes this rank's local shard of ``dt`` covers."""
    mesh = dt.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not part of the tensor's mesh
        return []
    specs = placement_specs(fqn, dt)
    boxes = local_boxes(tuple(dt.shape), tuple(mesh.shape), tuple(coord), specs)
    local = dt.to_local()
    want = tuple(local.shape)
    got = [0] * len(want)
    for b in boxes:
        for d, (lo, n) in enumerate(zip(b.local_offsets, b.shape)):
            got[d] = max(got[d], lo + n)
    if boxes and tuple(got) != want:
        raise InvalidStateError(
            f"{fqn!r}: local shard has shape {list(want)} but placements "
            f"{list(dt.placements)} on mesh {list(mesh.shape)} imply {got}"
        )
    return boxes


def dtensor_layout(dt: DTensor) -> Layout:
    mesh = dt.device_mesh
    return Layout(
        mesh_shape=tuple(mesh.shape),
        mesh_dim_names=tuple(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
        placements=tuple(str(p) for p in dt.placements),
    )


def full_box(shape: tuple[int, ...]) -> list[Box]:
    if any(n == 0 for n in shape):
        return []
    return [Box((0,) * len(shape), tuple(shape), (0,) * len(shape))]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def region(t: torch.Tensor, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """View of ``t[offsets : offsets + shape]``."""
    idx = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
    return t[idx] if idx else t


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def content_digests(tensors: list[torch.Tensor]) -> list[tuple[str, int]]:
    """A digest of each tensor's bytes, computed where it lives (nothing is copied to the host).

    CPU tensors: ``("crc32c", crc)``.  Others: ``("sums", s)`` from :func:`word_sums`, all
    of a device's tensors with one synchronisation.  Digests of one kind are equal for
    equal bytes; digests of different kinds cannot be compared.
    """
    out: list[tuple[str, int] | None] = [None] * len(tensors)
    on_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        flat = t.detach().contiguous().reshape(-1)
        if flat.device.type == "cpu":
            out[i] = ("crc32c", crc32c(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""))
        else:
            on_device.setdefault(flat.device, []).append((i, word_sums(flat)))
    for pending in on_device.values():
        values = torch.stack([sums for _, sums in pending]).tolist()
        for (i, _), v in zip(pending, values):
            out[i] = ("sums", sum((x & (1 << 64) - 1) << (64 * k) for k, x in enumerate(v)))
    return out  # type: ignore[return-value]


def word_sums(flat: torch.Tensor) -> torch.Tensor:
    """Six int64 sums of a flat contiguous tensor's bytes, on its device, in one pass.

    The 32-bit words (of the largest multiple of 4 words) are read as a ``(2, n, 2)``
    view and summed over ``n``: the even and odd words of each half.  The words and the
    bytes left over are summed apart.  Nothing of the tensor's size is allocated.
    """
    if flat.storage_offset() * flat.element_size() % 4:
        flat = flat.clone()  # a 32-bit view needs a 4-byte aligned start
    data = flat.view(torch.uint8)
    whole = data.numel() // 4 * 4
    words = data[:whole].view(torch.int32)
    quads = words.numel() // 4 * 4
    return torch.cat(
        [
            words[:quads].view(2, -1, 2).sum(dim=1, dtype=torch.int64).reshape(-1),
            words[quads:].sum(dtype=torch.int64).reshape(1),
            data[whole:].sum(dtype=torch.int64).reshape(1),
        ]
    )
