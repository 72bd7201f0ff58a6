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


def content_digest(t: torch.Tensor) -> tuple[str, int]:
    """A digest of a tensor's bytes, computed where the tensor lives (no copy to the host).

    CPU tensors: ``("crc32c", crc)``.  Others: ``("sums", s)``: the sums of the tensor's
    32-bit words (all of them, those at even positions, those of the first half) and of
    its trailing bytes, as int64 reductions on the device, which read the tensor about
    three times and allocate nothing of its size.  Digests of the same kind are equal for
    equal bytes; digests of different kinds cannot be compared.
    """
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type == "cpu":
        return "crc32c", crc32c(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
    return "sums", word_sums(flat)


def word_sums(flat: torch.Tensor) -> int:
    """The ``"sums"`` digest of :func:`content_digest` of a flat contiguous tensor, on its device."""
    if flat.storage_offset() * flat.element_size() % 4:
        flat = flat.clone()  # a 32-bit view needs a 4-byte aligned start
    data = flat.view(torch.uint8)
    whole = data.numel() // 4 * 4
    words = data[:whole].view(torch.int32)
    sums = torch.stack(
        [
            words.sum(dtype=torch.int64),
            words[::2].sum(dtype=torch.int64),
            words[: words.numel() // 2].sum(dtype=torch.int64),
            data[whole:].sum(dtype=torch.int64),
        ]
    ).tolist()
    return sum((v & (1 << 64) - 1) << (64 * k) for k, v in enumerate(sums))
