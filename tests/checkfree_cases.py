"""A layered model trained as four pipeline stages in one process (each stage with its own
AdamW, as pipeline ranks have), for the CheckFree recovery tests: a stage's weights are
wiped mid-training and rebuilt from its neighbours, or re-initialised at random.

The model is a residual stack of 8 MLP blocks between an input projection and a head,
learning a fixed random teacher network (small, so the test costs seconds on a busy CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from stashpoint.recovery import grad_norm, rebuild_stage

STAGES, LAYERS, DIM, IN, OUT, BATCH, LR = 4, 8, 32, 16, 8, 64, 3e-3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class Layered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.head = nn.Linear(DIM, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers.values():
            h = layer(h)
        return self.head(h)


def _teacher() -> nn.Module:
    torch.manual_seed(99)
    layers = [nn.Linear(IN, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(128, OUT))


def stages(model: Layered) -> list[nn.ModuleDict]:
    """The layer containers of the four stages (two global layers each)."""
    per = LAYERS // STAGES
    ids = [[str(i) for i in range(s * per, (s + 1) * per)] for s in range(STAGES)]
    return [nn.ModuleDict({i: model.layers[i] for i in stage}) for stage in ids]


def stage_params(model: Layered, s: int) -> list[nn.Parameter]:
    params = list(stages(model)[s].parameters())
    if s == 0:
        params += list(model.inp.parameters())
    if s == STAGES - 1:
        params += list(model.head.parameters())
    return params


def run(steps: int, fail_at: int | None = None, recovery: str = "checkfree", lost: int = 2) -> dict:
    """Train ``steps``; before step ``fail_at`` stage ``lost``'s layers are wiped and
    recovered by ``recovery`` ("checkfree" or "random").  Returns the losses and the record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = _teacher()
        torch.manual_seed(0)
        model = Layered()
        optims = [torch.optim.AdamW(stage_params(model, s), lr=LR) for s in range(STAGES)]
        losses, record = [], None
        for step in range(steps):
            if step == fail_at:
                record = _fail_and_recover(model, optims, lost, recovery)
            g = torch.Generator().manual_seed(7000 + step)
            x = 2 * torch.randn(BATCH, IN, generator=g)
            with torch.no_grad():
                y = teacher(x)
            for o in optims:
                o.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            for o in optims:
                o.step()
            losses.append(loss.item())
        return {"losses": losses, "record": record}
    finally:
        torch.set_num_threads(threads)


def _fail_and_recover(model: Layered, optims: list, lost: int, recovery: str):
    parts = stages(model)
    norms = [grad_norm(p) for p in parts]  # the last step's gradients, kept before the loss
    with torch.no_grad():
        for p in parts[lost].parameters():
            p.fill_(float("nan"))  # the stage's weights are gone
    if recovery == "random":
        torch.manual_seed(123)
        for layer in parts[lost].values():
            layer.load_state_dict(Block().state_dict())
        optims[lost].state.clear()
        return None
    return rebuild_stage(
        parts[lost],
        prev_stage=parts[lost - 1] if lost > 0 else None,
        next_stage=parts[lost + 1] if lost < STAGES - 1 else None,
        prev_grad_norm=norms[lost - 1] if lost > 0 else None,
        next_grad_norm=norms[lost + 1] if lost < STAGES - 1 else None,
        optimizers=optims,
    )
