"""A small GPT-style decoder, deterministic data and an FSDP2 training step.

Shared by the demo and the resume tests, so both exercise the same code path.
Sizes are deliberately uneven (not divisible by 2, 3 or 4) so that sharding
produces ragged shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stashpoint._dist import Coordinator


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 67
    dim: int = 30
    heads: int = 3
    layers: int = 2
    mlp: int = 74
    seq: int = 16


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, cfg.mlp)
        self.down = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model(cfg: GPTConfig, seed: int = 0) -> TinyGPT:
    """Identical initial weights on every rank."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    with torch.no_grad():
        model.pos.normal_(0, 0.02)
    return model


def shard_fsdp(model: TinyGPT, mesh) -> TinyGPT:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(cfg: GPTConfig, step: int, global_batch: int, rank: int, world: int, seed: int = 1):
    """This rank's slice of the global batch of ``step``: same data at any world size."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} must divide by world size {world}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    data = torch.randint(0, cfg.vocab, (global_batch, cfg.seq + 1), generator=g)
    per = global_batch // world
    rows = data[rank * per : (rank + 1) * per]
    return rows[:, :-1], rows[:, 1:]


def train_step(model, optim, cfg: GPTConfig, step: int, global_batch: int, rank: int, world: int) -> float:
    """One step; returns the global mean loss (all ranks agree on it)."""
    x, y = batch(cfg, step, global_batch, rank, world)
    loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab), y.reshape(-1))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    losses = Coordinator().all_gather(float(loss.detach()), "demo: mean loss")
    return sum(losses) / len(losses)
