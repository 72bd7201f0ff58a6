"""The synthetic corpus of benchmarks/checkfree_lm.py and its batches: words spelt from a
small alphabet, chosen by a sparse word-level Markov chain (each word has a few likely
successors), sentences ended by a full stop; every draw seeded, on the CPU."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch


def corpus(cfg: Any) -> tuple[torch.Tensor, int]:
    """Token ids of the synthetic text and the vocabulary size."""
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    lengths = torch.randint(*cfg.word_len, (cfg.words,), generator=g)
    words = [torch.randint(0, cfg.letters, (int(n),), generator=g).tolist() for n in lengths]
    k = len(cfg.successor_probs)
    successors = [torch.randperm(cfg.words, generator=g)[:k].tolist() for _ in range(cfg.words)]
    if cfg.corpus_rng == "torch":
        probs = torch.tensor(cfg.successor_probs)
        uniform: Callable[[], float] = lambda: float(torch.rand((), generator=g))
        pick: Callable[[], int] = lambda: int(torch.multinomial(probs, 1, generator=g))
    else:
        rng = random.Random(1000 + cfg.seed)
        uniform = rng.random
        pick = lambda: rng.choices(range(k), weights=cfg.successor_probs)[0]
    space, stop = cfg.letters, cfg.letters + 1
    out: list[int] = []
    word, in_sentence = 0, 0
    while len(out) < cfg.corpus_chars:
        out.extend(words[word])
        in_sentence += 1
        if in_sentence >= 4 and uniform() < 0.3:
            out.append(stop)
            in_sentence = 0
        out.append(space)
        word = successors[word][pick()]
    return torch.tensor(out[: cfg.corpus_chars]), cfg.letters + 2


def batch_starts(n_chars: int, cfg: Any) -> torch.Tensor:
    """The first character of every sequence of every step, (steps, batch), drawn on the
    CPU from per-step generators (the same on every device)."""
    rows = []
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(50_000 + step)
        rows.append(torch.randint(0, n_chars - cfg.context - 1, (cfg.batch,), generator=g))
    return torch.stack(rows)
