"""Searches over coefficient vectors: greedy soup and LCSC.

Both are written against a *fitness* function ``weights -> score`` (higher is
better unless ``maximize: false``); :mod:`stashpoint.merging` builds it by writing the
candidate merge to a temporary checkpoint and calling the user's evaluation (a
Python callable or a command) on its path.  Scores are cached per coefficient
vector, so a candidate is never merged or evaluated twice.
"""

from __future__ import annotations

import math
import random
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from stashpoint.errors import EvaluationError, MergeConfigError
from stashpoint.merging.registry import SEARCH, Params, register

Weights = tuple[float, ...]
Fitness = Callable[[Weights], float]
#: the user's evaluation: the path of a candidate checkpoint -> a score
Evaluator = Callable[[str], float]

_DIGITS = 6  # coefficients are rounded so that cache keys are exact


@dataclass(frozen=True)
class SearchResult:
    weights: Weights
    score: float
    #: every distinct candidate evaluated, in order, with its score
    history: tuple[tuple[Weights, float], ...]
    #: greedy soup: the inputs in the soup, in the order they were accepted
    members: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {
            "weights": list(self.weights),
            "score": self.score,
            "members": list(self.members),
            "history": [{"weights": list(w), "score": s} for w, s in self.history],
        }


class CachedFitness:
    """Memoises a fitness function per (rounded) coefficient vector and keeps the history."""

    def __init__(self, fitness: Fitness, maximize: bool) -> None:
        self._fitness, self.maximize = fitness, maximize
        self.cache: dict[Weights, float] = {}

    def __call__(self, weights: Weights) -> float:
        key = tuple(round(float(w), _DIGITS) + 0.0 for w in weights)  # + 0.0: no -0.0 keys
        if key not in self.cache:
            score = float(self._fitness(key))
            if not math.isfinite(score):
                raise EvaluationError(f"evaluation of weights {list(key)} returned {score}")
            self.cache[key] = score
        return self.cache[key]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    @property
    def history(self) -> tuple[tuple[Weights, float], ...]:
        return tuple(self.cache.items())


def _one_hot(n: int, i: int) -> Weights:
    return tuple(1.0 if j == i else 0.0 for j in range(n))


def _uniform_over(n: int, members: list[int]) -> Weights:
    return tuple(1.0 / len(members) if j in members else 0.0 for j in range(n))


@register("greedy_soup", kind=SEARCH, defaults={"maximize": True})
def greedy_soup(n: int, fitness: CachedFitness, params: Params) -> SearchResult:
    """Greedy soup: add models best-first, keeping each only if the uniform soup improves."""
    scores = [fitness(_one_hot(n, i)) for i in range(n)]
    order = sorted(range(n), key=lambda i: -scores[i] if fitness.maximize else scores[i])
    members = [order[0]]
    best = scores[order[0]]
    for cand in order[1:]:
        score = fitness(_uniform_over(n, [*members, cand]))
        if fitness.better(score, best):  # strictly better only
            members.append(cand)
            best = score
    weights = tuple(round(w, _DIGITS) + 0.0 for w in _uniform_over(n, members))
    return SearchResult(weights, best, fitness.history, tuple(members))


@register(
    "lcsc",
    kind=SEARCH,
    defaults={"population": 8, "generations": 5, "mutation_scale": 0.1, "seed": 0, "maximize": True},
)
def lcsc(n: int, fitness: CachedFitness, params: Params) -> SearchResult:
    """LCSC: evolutionary search for the coefficients of a linear combination of checkpoints.

    The first population holds the uniform average, the last checkpoint and
    Gaussian perturbations of the uniform average.  Each generation keeps the best
    quarter (at least one) and refills the population with mutated copies of them
    (each coefficient plus N(0, mutation_scale^2)).  Coefficients are not
    normalised and may be negative or exceed 1.
    """
    size, gens = int(params["population"]), int(params["generations"])
    scale = float(params["mutation_scale"])
    if size < 2 or gens < 0 or scale < 0:
        raise MergeConfigError(
            f"lcsc: needs population >= 2, generations >= 0, mutation_scale >= 0; got {dict(params)}"
        )
    rng = random.Random(int(params["seed"]))

    def mutate(w: Weights) -> Weights:
        return tuple(round(x + rng.gauss(0.0, scale), _DIGITS) + 0.0 for x in w)

    uniform = tuple(round(1.0 / n, _DIGITS) for _ in range(n))
    population = [uniform, _one_hot(n, n - 1)]
    while len(population) < size:
        population.append(mutate(uniform))
    elite_n = max(1, size // 4)
    for _ in range(gens):
        ranked = sorted(population, key=lambda w: -fitness(w) if fitness.maximize else fitness(w))
        elites = ranked[:elite_n]
        population = list(elites)
        while len(population) < size:
            population.append(mutate(elites[rng.randrange(len(elites))]))
    for w in population:
        fitness(w)
    best_w, best = None, 0.0
    for w, s in fitness.history:  # first of the best, in evaluation order
        if best_w is None or fitness.better(s, best):
            best_w, best = w, s
    assert best_w is not None
    return SearchResult(best_w, best, fitness.history)


def command_evaluator(command: str, timeout_s: float | None = None) -> Evaluator:
    """Run ``command`` (``{path}`` replaced by the candidate's path, else the path appended);
    the last line of its stdout is the score."""

    def evaluate(path: str) -> float:
        argv = shlex.split(command)
        if any("{path}" in a for a in argv):
            argv = [a.replace("{path}", path) for a in argv]
        else:
            argv.append(path)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EvaluationError(f"evaluation command {command!r} failed on {path}: {exc}") from exc
        if proc.returncode != 0:
            raise EvaluationError(
                f"evaluation command {command!r} exited {proc.returncode} on {path}: "
                f"{proc.stderr.strip()[-500:]}"
            )
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
        try:
            return float(lines[-1])
        except (IndexError, ValueError):
            raise EvaluationError(
                f"evaluation command {command!r} on {path}: the last line of stdout is not a number "
                f"({lines[-1] if lines else 'no output'!r})"
            ) from None

    return evaluate
