"""Rank tasks for test_names_dist.py: pipeline stages whose ModuleLists restart at 0, the
save-time collision check, and DDP-wrapped modules, on a real gloo group."""

from __future__ import annotations

import os

import torch
from torch import nn

import stashpoint as sp
from stashpoint.errors import NameCollisionError

LAYERS = 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)


class Stage(nn.Module):
    """Layers ``first .. first + count - 1`` of the reference model, numbered from 0."""

    def __init__(self, first: int, count: int, embed: bool, head: bool) -> None:
        super().__init__()
        ref = reference()
        self.layers = nn.ModuleList(Block() for _ in range(count))
        for i in range(count):
            self.layers[i].load_state_dict(ref.layers[first + i].state_dict())
        if embed:
            self.embed = nn.Linear(4, 4)
            self.embed.load_state_dict(ref.embed.state_dict())
        if head:
            self.head = nn.Linear(4, 2)
            self.head.load_state_dict(ref.head.state_dict())


def reference(seed: int = 0) -> Stage:
    """The unsplit model (every rank builds the same one from the seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Stage.__new__(Stage)
        nn.Module.__init__(model)
        model.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        model.embed = nn.Linear(4, 4)
        model.head = nn.Linear(4, 2)
    return model


def bits(module: nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()
    }


def split(rank: int, world: int, counts: list[int]) -> tuple[Stage, sp.StageLayout]:
    layout = sp.stage_layouts("layers", counts)[rank]
    stage = Stage(layout.first_layer, layout.num_layers, embed=rank == 0, head=rank == world - 1)
    return stage, layout


def stages_collide_without_layouts(rank: int, world: int, path: str) -> str:
    """Two stages with layers.0..1 each: a named error on every rank, and the previous
    checkpoint at the path stays as it was."""
    stage, _ = split(rank, world, [2, 2])
    sp.save({"model": reference(seed=3)}, path)
    before = bits(reference(seed=3))
    try:
        sp.save({"model": stage}, path, overwrite=True)
    except NameCollisionError as exc:
        message = str(exc)
    else:
        raise AssertionError("stages that share layer names were saved")
    kept = reference(seed=7)
    sp.load({"model": kept}, path)
    assert bits(kept) == before, "the failed save changed the previous checkpoint"
    return message


def stages_save_and_load_unsplit_and_resplit(rank: int, world: int, path: str) -> dict:
    """Saved as stages [2, 2] with their layouts; loaded whole and as stages [3, 1], bit-exact."""
    stage, layout = split(rank, world, [2, 2])
    sp.save({"model": sp.WithLayout(stage, layout)}, path)
    index = sp.read_index(path)
    whole = reference(seed=11)
    sp.load({"model": whole}, path)  # strict: every name of the unsplit model is there
    resplit, relayout = split(rank, world, [3, 1])
    for p in resplit.parameters():
        p.data.fill_(-1.0)
    sp.load({"model": sp.WithLayout(resplit, relayout)}, path)
    ref = reference()
    want = {
        f"layers.{relayout.first_layer + int(k.split('.')[1])}.{k.split('.', 2)[2]}": v
        for k, v in bits(resplit).items()
        if k.startswith("layers.")
    }
    return {
        "whole": bits(whole) == bits(ref),
        "resplit": all(bits(ref)[k] == v for k, v in want.items()) and len(want) == 4 * relayout.num_layers,
        "resplit_ends": all(
            bits(ref)[k] == v for k, v in bits(resplit).items() if not k.startswith("layers.")
        ),
        "layouts": [(n.rank, n.key, n.global_ids) for n in index.metadata.layouts],
        "names": sorted(n for n in index.items if ".layers." in n and n.endswith("attn.weight")),
    }


def _ddp(seed: int) -> nn.Module:
    model = reference(seed)
    model.forward = lambda x: model.head(model.embed(x))  # type: ignore[method-assign]
    return nn.parallel.DistributedDataParallel(model)


def ddp_and_plain_round_trip(rank: int, world: int, path: str) -> dict:
    """DDP-wrapped -> plain and plain -> DDP-wrapped; replicated tensors written once."""
    ddp = _ddp(seed=1)
    sp.save({"model": ddp}, os.path.join(path, "from-ddp"))
    index = sp.read_index(os.path.join(path, "from-ddp"))
    plain = reference(seed=2)
    sp.load({"model": plain}, os.path.join(path, "from-ddp"))
    sp.save({"model": reference(seed=4)}, os.path.join(path, "from-plain"))
    ddp2 = _ddp(seed=5)
    sp.load({"model": ddp2}, os.path.join(path, "from-plain"))
    model_bytes = sum(t.numel() * t.element_size() for t in reference().state_dict().values())
    return {
        "names": sorted(index.items) == sorted(f"model.{k}" for k in reference().state_dict()),
        "to_plain": bits(plain) == bits(reference(seed=1)),
        "to_ddp": bits(ddp2.module) == bits(reference(seed=4)),
        "written_once": index.total_bytes == model_bytes
        and all(len(rec.chunks) == 1 for rec in index.items.values()),
    }
