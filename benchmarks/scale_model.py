"""The simulated 70B-class training state of ``scale_sim.py``: items, layouts, inventories.

Llama-3-70B shapes: 80 layers, hidden 8192, 64 query and 8 key/value heads of 128,
MLP 28672, vocabulary 128256.  Every parameter has two Adam moments of its shape and
a scalar ``step``; all float32 (FSDP keeps fp32 master weights), 12 bytes a parameter.
Layouts: FSDP over N ranks (``Shard(0)`` on a 1-D mesh) and FSDP x TP(8) on an
``(N/8, 8)`` mesh with torchtitan's plan (column-parallel weights and the embedding and
head ``Shard(0)`` over TP, so FSDP's ``Shard(0)`` is strided; row-parallel ``Shard(1)``;
norms replicated over TP).  No torch, no processes: only stashpoint's planning code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from stashpoint.format.grid import TensorGrid
from stashpoint.format.index import Layout
from stashpoint.planning.layout import REPLICATE, Box, PlacementSpec, dim_runs, local_boxes
from stashpoint.planning.load_plan import TargetTensor
from stashpoint.planning.save_plan import ItemPlan, LocalItem

LAYERS, HIDDEN, KV, MLP, VOCAB, TP = 80, 8192, 1024, 28672, 128256, 8


@dataclass(frozen=True)
class Item:
    fqn: str
    shape: tuple[int, ...]
    tp: str  # "col" | "row" | "rep": how TP cuts it ("" for a replicated scalar)


def items() -> list[Item]:
    params = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "col")]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        params += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), "col"),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN), "col"),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN), "col"),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), "row"),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN), "col"),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN), "col"),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP), "row"),
            (p + "input_layernorm.weight", (HIDDEN,), "rep"),
            (p + "post_attention_layernorm.weight", (HIDDEN,), "rep"),
        ]
    params += [("model.norm.weight", (HIDDEN,), "rep"), ("lm_head.weight", (VOCAB, HIDDEN), "col")]
    out = []
    for name, shape, tp in params:
        out.append(Item(f"model.{name}", shape, tp))
        out.append(Item(f"optim.state.{name}.exp_avg", shape, tp))
        out.append(Item(f"optim.state.{name}.exp_avg_sq", shape, tp))
        out.append(Item(f"optim.state.{name}.step", (), ""))
    return out


def mesh_of(kind: str, world: int) -> tuple[int, ...]:
    return (world,) if kind == "fsdp" else (world // TP, TP)


def specs(kind: str, tp: str) -> tuple[tuple[PlacementSpec, ...], tuple[str, ...]]:
    """The placements (for the planner, and as the index's layout strings) of one item."""
    if kind == "fsdp":
        return (PlacementSpec("shard", 0),), ("S(0)",)
    if tp == "col":
        return (PlacementSpec("strided", 0, TP), PlacementSpec("shard", 0)), ("_S(0, 8)", "S(0)")
    if tp == "row":
        return (PlacementSpec("shard", 0), PlacementSpec("shard", 1)), ("S(0)", "S(1)")
    return (PlacementSpec("shard", 0), REPLICATE), ("S(0)", "R")


def coordinate(mesh: tuple[int, ...], rank: int) -> tuple[int, ...]:
    out = []
    for m in reversed(mesh):
        out.append(rank % m)
        rank //= m
    return tuple(reversed(out))


@cache
def boxes(kind: str, tp: str, shape: tuple[int, ...], world: int, rank: int) -> tuple[Box, ...]:
    if not shape:
        return (Box((), (), ()),)
    mesh = mesh_of(kind, world)
    return tuple(local_boxes(shape, mesh, coordinate(mesh, rank), specs(kind, tp)[0]))


def local_shape(kind: str, tp: str, shape: tuple[int, ...], world: int, rank: int) -> tuple[int, ...]:
    if not shape:
        return ()
    mesh = mesh_of(kind, world)
    runs = dim_runs(shape, mesh, coordinate(mesh, rank), specs(kind, tp)[0])
    return tuple(sum(b - a for a, b in r) for r in runs)


def layout(kind: str, tp: str, world: int) -> Layout:
    mesh = mesh_of(kind, world)
    names = ("dp",) if kind == "fsdp" else ("dp", "tp")
    return Layout(mesh_shape=mesh, mesh_dim_names=names, placements=specs(kind, tp)[1])


def inventory(kind: str, world: int, rank: int, model: list[Item]) -> list[LocalItem]:
    """What one rank holds, as the save planner is given it."""
    out = []
    for it in model:
        scalar = not it.shape
        out.append(
            LocalItem(
                fqn=it.fqn,
                is_tensor=True,
                scope="replicated" if scalar else "sharded",
                dtype="float32",
                shape=it.shape,
                itemsize=4,
                boxes=boxes(kind, it.tp, it.shape, world, rank),
                layout=None if scalar else layout(kind, it.tp, world),
            )
        )
    return out


def item_plans(kind: str, world: int, model: list[Item]) -> dict[str, ItemPlan]:
    """What the save plan records of every item (what the index is built from)."""
    return {
        it.fqn: ItemPlan(
            fqn=it.fqn,
            is_tensor=True,
            scope="global",
            dtype="float32",
            shape=it.shape,
            layout=layout(kind, it.tp, world) if it.shape else None,
            encoding="",
        )
        for it in model
    }


def targets(kind: str, world: int, rank: int, model: list[Item]) -> dict[str, TargetTensor]:
    """What one loading rank asks for."""
    return {
        it.fqn: TargetTensor(
            fqn=it.fqn,
            dtype="float32",
            shape=it.shape,
            local_shape=local_shape(kind, it.tp, it.shape, world, rank),
            boxes=boxes(kind, it.tp, it.shape, world, rank),
            itemsize=4,
        )
        for it in model
    }


def rule_grid(kind: str, tp: str, shape: tuple[int, ...], world: int) -> TensorGrid:
    """The grid a save at ``world`` ranks gets, from the layout rule alone: each cell in
    the file of the rank at its mesh coordinate (TP-replicated pieces: TP rank 0)."""
    mesh = mesh_of(kind, world)
    if kind == "fsdp":
        splits, steps = [(world,)] + [()] * (len(shape) - 1), [(1,)] + [()] * (len(shape) - 1)
    elif tp == "col":
        splits, steps = [(TP, world // TP)] + [()] * (len(shape) - 1), [(1, TP)] + [()] * (len(shape) - 1)
    elif tp == "row":
        splits, steps = [(mesh[0],), (TP,)], [(TP,), (1,)]
    else:
        splits, steps = [(mesh[0],)], [(TP,)]
    return TensorGrid(shape=shape, splits=tuple(splits), first=0, steps=tuple(steps))


def owned_cells(grid: TensorGrid, kind: str, tp: str, world: int, rank: int):
    """The cells of ``grid`` in rank ``rank``'s file (it holds every cell it writes)."""
    for b in boxes(kind, tp, grid.shape, world, rank):
        for cell in grid.cells(b.offsets, b.shape):
            if cell.rank == rank:
                yield cell


def classes(model: list[Item]) -> dict[tuple[tuple[int, ...], str], list[Item]]:
    """Items grouped by (shape, TP kind): every item of a group is cut the same way."""
    out: dict = {}
    for it in model:
        if it.shape:
            out.setdefault((it.shape, it.tp), []).append(it)
    return out
