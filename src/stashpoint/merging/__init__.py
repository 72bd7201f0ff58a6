"""Merging checkpoints: trajectory averages, soups, LCSC and merges of fine-tunes.

:func:`merge` reads stashpoint checkpoints (any world size and layout) and HF
safetensors directories one tensor at a time and writes a stashpoint checkpoint
or an HF directory.  See ``docs/MERGING.md`` for the methods and their formulas.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

from stashpoint.errors import EvaluationError, MergeConfigError, StashpointError
from stashpoint.merging.config import MergeConfig, ModelSpec, load_config, parse_config
from stashpoint.merging.plan import MergePlan
from stashpoint.merging.registry import LINEAR, SEARCH, ParamValue, method_names
from stashpoint.merging.run import Inputs, MergeReport, execute, open_inputs, plan_for, weight_context
from stashpoint.merging.search import CachedFitness, Evaluator, SearchResult, command_evaluator
from stashpoint.merging.weights import LinearWeights

PathLike = str | os.PathLike
ConfigLike = MergeConfig | Mapping[str, object] | PathLike


def build_config(
    config: ConfigLike | None,
    *,
    models: Sequence[PathLike] | None = None,
    method: str | None = None,
    base_model: PathLike | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    missing: str | None = None,
    output_format: str | None = None,
    device: str | None = None,
) -> MergeConfig:
    """A validated configuration from a file, a mapping or keywords (keywords win)."""
    if isinstance(config, MergeConfig):
        doc: dict[str, object] = {}
        base_cfg: MergeConfig | None = config
    else:
        base_cfg = None
        if config is None:
            doc = {}
        elif isinstance(config, Mapping):
            doc = dict(config)
        else:
            doc = load_config(config)
    overrides = {
        "models": [os.fspath(m) for m in models] if models is not None else None,
        "merge_method": method,
        "base_model": os.fspath(base_model) if base_model is not None else None,
        "parameters": dict(parameters) if parameters is not None else None,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "missing": missing,
        "output_format": output_format,
        "device": device,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base_cfg is not None:
        if not overrides:
            return base_cfg
        doc = base_cfg.to_doc()
    if "parameters" in overrides and isinstance(doc.get("parameters"), Mapping):
        overrides["parameters"] = {**doc["parameters"], **overrides["parameters"]}
    doc.update(overrides)
    return parse_config(doc)


def merge(
    config: ConfigLike | None = None,
    out: PathLike | None = None,
    *,
    models: Sequence[PathLike] | None = None,
    method: str | None = None,
    base_model: PathLike | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    missing: str | None = None,
    output_format: str | None = None,
    device: str | None = None,
    evaluate: Evaluator | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Merge checkpoints into ``out``; see :func:`stashpoint.merge` for the arguments."""
    if out is None:
        raise MergeConfigError("merge needs an output path")
    out = os.fspath(out)
    cfg = build_config(
        config,
        models=models,
        method=method,
        base_model=base_model,
        parameters=parameters,
        dtype=dtype,
        out_dtype=out_dtype,
        missing=missing,
        output_format=output_format,
        device=device,
    )
    inputs = open_inputs(cfg)
    plan = plan_for(cfg, inputs)  # every check that needs no data happens before writing
    spec = cfg.spec
    search = None
    linear = None
    if spec.kind == LINEAR:
        linear = spec.fn(weight_context(cfg, inputs))
    elif spec.kind == SEARCH:
        evaluator = _evaluator(evaluate if evaluate is not None else cfg.evaluate, spec.name)
        fitness = CachedFitness(
            _candidate_fitness(cfg, inputs, plan, out, evaluator), bool(cfg.params()["maximize"])
        )
        search = spec.fn(len(cfg.models), fitness, cfg.params())
        linear = LinearWeights(search.weights)
    report = execute(cfg, inputs, plan, out, linear=linear, overwrite=overwrite, progress=progress)
    if search is not None:
        from dataclasses import replace

        report = replace(report, search=search)
    return report


def _evaluator(evaluate: Evaluator | str | None, method: str) -> Evaluator:
    if evaluate is None:
        raise MergeConfigError(f"{method} needs an evaluation: evaluate=callable or a command")
    if isinstance(evaluate, str):
        return command_evaluator(evaluate)
    return evaluate


def _candidate_fitness(
    cfg: MergeConfig, inputs: Inputs, plan: MergePlan, out: str, evaluate: Evaluator
) -> Callable[[tuple[float, ...]], float]:
    """Write the candidate next to the output, evaluate it, delete it."""
    from stashpoint.merging.writer import remove_output

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)

    def fitness(weights: tuple[float, ...]) -> float:
        tmp = tempfile.mkdtemp(prefix=".merge-candidate-", dir=parent)
        path = os.path.join(tmp, "candidate")
        try:
            execute(cfg, inputs, plan, path, linear=LinearWeights(weights), overwrite=False, progress=False)
            try:
                return float(evaluate(path))
            except StashpointError:
                raise
            except Exception as exc:
                raise EvaluationError(
                    f"evaluation of candidate weights {list(weights)} failed: {exc}"
                ) from exc
        finally:
            remove_output(tmp)

    return fitness


__all__ = [
    "MergeConfig",
    "MergeReport",
    "ModelSpec",
    "SearchResult",
    "build_config",
    "command_evaluator",
    "load_config",
    "merge",
    "method_names",
    "parse_config",
]
