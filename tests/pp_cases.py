"""Pipeline-parallel training on CPU (torch.distributed.pipelining over gloo), run on the
ranks of a RankPool: a small transformer whose stages keep their global layer names (a
``nn.ModuleDict`` keyed by global layer id, the other layers deleted, as torchtitan does)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import stashpoint

VOCAB, DIM, HEADS, LAYERS, SEQ = 64, 32, 4, 8, 8
BATCH, MICROBATCHES, LR = 8, 4, 3e-3
_MESHES: dict = {}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu(1)
        h = h + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """The whole model, or one stage of it: ``layers`` are the global layer ids it keeps."""

    def __init__(self, layers: list[int] | None = None, first: bool = True, last: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)  # every stage builds the whole model, so weights match any split
        self.tok = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        for i in range(LAYERS):
            if layers is not None and i not in layers:
                del self.layers[str(i)]
        if not first:
            self.tok = None
        if not last:
            self.norm = self.head = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) if self.tok is not None else x
        for layer in self.layers.values():
            h = layer(h)
        return self.head(self.norm(h)) if self.head is not None else h


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def even_split(stages: int) -> list[list[int]]:
    per = LAYERS // stages
    return [list(range(s * per, (s + 1) * per)) for s in range(stages)]


def _mesh(dp: int, pp: int):
    if (dp, pp) not in _MESHES:
        _MESHES[(dp, pp)] = init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))
    return _MESHES[(dp, pp)]


def train(rank: int, world: int, split: list[list[int]], steps: range, options: dict) -> list[float] | None:
    """Train ``steps`` on a dp x pp mesh (pp = len(split)); returns the losses on the
    first dp replica's last stage (None elsewhere).  ``options``: ``dp`` (1), ``load`` (a
    checkpoint to resume from), ``save`` (step -> path saved after it), ``schedule``
    ("gpipe" or "1f1b"), ``model_only`` (resume the weights but not the optimizer)."""
    dp, load, save = options.get("dp", 1), options.get("load"), options.get("save", {})
    schedule = options.get("schedule", "gpipe")
    pp = len(split)
    mesh = _mesh(dp, pp)
    stage_id, replica = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    model = Transformer(split[stage_id], first=stage_id == 0, last=stage_id == pp - 1)
    optim = optimizer(model)
    state = {"model": model, "optim": optim}
    if load is not None:
        target = {"model": model} if options.get("model_only") else state
        stashpoint.load(target, load, strict=not options.get("model_only"))
    stage = PipelineStage(model, stage_id, pp, torch.device("cpu"), group=mesh["pp"].get_group())
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = kind(stage, MICROBATCHES // dp if dp > 1 else MICROBATCHES, loss_fn=loss_fn)
    losses = []
    for step in steps:
        x, y = batch(step)
        per = BATCH // dp
        x, y = x[replica * per : (replica + 1) * per], y[replica * per : (replica + 1) * per]
        optim.zero_grad()
        mb_losses: list[torch.Tensor] = []
        if stage_id == 0:
            sched.step(x, target=y if pp == 1 else None, losses=mb_losses if pp == 1 else None)
        elif stage_id == pp - 1:
            sched.step(target=y, losses=mb_losses)
        else:
            sched.step()
        if dp > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=mesh["dp"].get_group())
                p.grad /= dp
        optim.step()
        if stage_id == pp - 1:
            loss = torch.stack(mb_losses).mean()
            if dp > 1:
                dist.all_reduce(loss, group=mesh["dp"].get_group())
                loss /= dp
            losses.append(loss.item())
        if save and step in save:
            stashpoint.save(state, save[step], step=step)
    return losses if stage_id == pp - 1 and replica == 0 else None


def train_whole(steps: range, load: str) -> list[float]:
    """PP=1 in this process: the whole model, the schedule's microbatches by hand (each
    microbatch's loss backward, gradients scaled by 1/microbatches, as the schedules do)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks compute single-threaded too
    try:
        model = Transformer()
        optim = optimizer(model)
        stashpoint.load({"model": model, "optim": optim}, load)  # param groups: any PP size
        losses = []
        for step in steps:
            x, y = batch(step)
            optim.zero_grad()
            mb = [loss_fn(model(xs), ys) for xs, ys in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES))]
            for loss in mb:
                loss.backward()
            for p in model.parameters():
                p.grad /= MICROBATCHES
            optim.step()
            losses.append(torch.stack(mb).mean().item())
        return losses
    finally:
        torch.set_num_threads(threads)


def _holding(name: str, value: float) -> nn.Module:
    module = nn.Module()
    module.register_buffer(name, torch.full((2,), value))
    return module


def unclaimed_case(rank: int, world: int, path: str) -> tuple[bool, str]:
    """Each rank saves and loads only its own item; then no rank has a place for rank 3's."""
    stashpoint.save({"m": _holding(f"w{rank}", float(rank))}, path)
    mine = _holding(f"w{rank}", -1.0)
    stashpoint.load({"m": mine}, path)  # strict: every item has a place on some rank
    loaded = torch.equal(getattr(mine, f"w{rank}"), torch.full((2,), float(rank)))
    other = _holding(f"w{rank % 3}", -1.0)
    try:
        stashpoint.load({"m": other}, path)
    except stashpoint.errors.UnexpectedKeyError as exc:
        return loaded and bool((getattr(other, f"w{rank % 3}") == -1).all()), str(exc)
    return False, "no error"
