"""The merge configuration: mergekit's YAML keys where the concept is the same.

``parse_config`` turns a mapping (from YAML, JSON or Python) into a frozen
:class:`MergeConfig`, checking every key and parameter against the method's
declaration, so that a typo fails before any tensor is read.  Differences from
mergekit are listed in ``docs/MERGING.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stashpoint.errors import InvalidOptionError, MergeConfigError
from stashpoint.merging.registry import MethodSpec, Params, ParamValue, get_method
from stashpoint.sizes import parse_size
from stashpoint.vocab import MergeDtype, MissingPolicy, OutputFormat, choose

#: mergekit keys with no meaning here: refused with a pointer to the docs, not ignored
_UNSUPPORTED = ("slices", "tokenizer_source", "tokenizer", "chat_template", "modules", "gradient")
_TOP_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "missing",
    "prefix",
    "optimizer_prefix",
    "output_format",
    "max_shard_size",
    "device",
    "evaluate",
    "verify",
}
_EMPTY: Params = MappingProxyType({})


@dataclass(frozen=True)
class ModelSpec:
    """One input: a stashpoint checkpoint or an HF safetensors directory."""

    path: str
    parameters: Params = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None = None
    parameters: Params = field(default_factory=lambda: _EMPTY)
    #: inputs are cast to it before the arithmetic (which accumulates in fp32 or wider)
    dtype: MergeDtype | None = None
    out_dtype: MergeDtype | None = None
    missing: MissingPolicy = "error"
    #: names under this prefix are merged; HF tensor names get it prepended
    prefix: str = "model."
    optimizer_prefix: str = "optim.state."
    output_format: OutputFormat = "stashpoint"
    max_shard_size: int = 5 * 10**9
    device: str = "cpu"
    #: command for soups and LCSC: ``{path}`` is replaced by the candidate's path
    evaluate: str | None = None
    verify: bool = True
    _spec: MethodSpec | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> MethodSpec:
        return self._spec if self._spec is not None else get_method(self.method)

    def model_params(self, i: int) -> dict[str, ParamValue]:
        """Method defaults, overridden by the global parameters, then by model ``i``'s own."""
        out = dict(self.spec.defaults)
        out.update(self.parameters)
        out.update(self.models[i].parameters)
        return out

    def params(self) -> dict[str, ParamValue]:
        out = dict(self.spec.defaults)
        out.update(self.parameters)
        return out

    def to_doc(self) -> dict[str, object]:
        """The configuration as a mapping :func:`parse_config` reads back (mergekit's keys first)."""
        return {
            "merge_method": self.method,
            "base_model": self.base_model,
            "models": [{"model": m.path, "parameters": dict(m.parameters)} for m in self.models],
            "parameters": dict(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "missing": self.missing,
            "prefix": self.prefix,
            "optimizer_prefix": self.optimizer_prefix,
            "output_format": self.output_format,
            "max_shard_size": self.max_shard_size,
            "device": self.device,
            "evaluate": self.evaluate,
            "verify": self.verify,
        }


def _params(where: str, value: object, allowed: set[str]) -> Params:
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise MergeConfigError(f"{where}: parameters must be a mapping, not {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if k not in allowed:
            raise MergeConfigError(
                f"{where}: parameter {k!r} is not used by this method; allowed: {', '.join(sorted(allowed))}"
            )
        if not isinstance(v, bool | int | float | str):
            raise MergeConfigError(f"{where}: parameter {k!r} must be a number, bool or string, not {v!r}")
        out[str(k)] = v
    return MappingProxyType(out)


def _model(i: int, entry: object, allowed: set[str]) -> ModelSpec:
    if isinstance(entry, str | os.PathLike):
        return ModelSpec(os.fspath(entry))
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise MergeConfigError(f"models[{i}]: expected a path or a mapping with a 'model' key, got {entry!r}")
    extra = set(entry) - {"model", "parameters"}
    if extra:
        raise MergeConfigError(f"models[{i}]: unknown keys {sorted(extra)}")
    return ModelSpec(
        os.fspath(entry["model"]),
        _params(f"models[{i}] ({entry['model']})", entry.get("parameters"), allowed),
    )


def parse_config(doc: Mapping[str, object]) -> MergeConfig:
    """Validate a mergekit-style mapping into a :class:`MergeConfig`."""
    if not isinstance(doc, Mapping):
        raise MergeConfigError(f"a merge configuration is a mapping, not {type(doc).__name__}")
    for key in doc:
        if key in _UNSUPPORTED:
            raise MergeConfigError(
                f"mergekit key {key!r} is not supported by stashpoint merge (see docs/MERGING.md)"
            )
        if key not in _TOP_KEYS:
            raise MergeConfigError(f"unknown key {key!r}; known: {', '.join(sorted(_TOP_KEYS))}")
    if "merge_method" not in doc:
        raise MergeConfigError("merge_method is required")
    spec = get_method(str(doc["merge_method"]))
    models_doc = doc.get("models") or []
    if not isinstance(models_doc, list | tuple):
        raise MergeConfigError("models must be a list")
    model_allowed = set(spec.model_params)
    models = tuple(_model(i, m, model_allowed) for i, m in enumerate(models_doc))
    base = doc.get("base_model")
    if isinstance(base, Mapping):  # mergekit allows {model: path}
        base = base.get("model")
    base = os.fspath(base) if base is not None else None
    models = _without_base(models, base, spec)
    global_allowed = set(spec.defaults) | model_allowed
    cfg = MergeConfig(
        method=spec.name,
        models=models,
        base_model=base,
        parameters=_params("parameters", doc.get("parameters"), global_allowed),
        dtype=_choice("dtype", doc.get("dtype"), MergeDtype, none_ok=True),
        out_dtype=_choice("out_dtype", doc.get("out_dtype"), MergeDtype, none_ok=True),
        missing=_choice("missing", doc.get("missing", "error"), MissingPolicy),
        prefix=str(doc.get("prefix", "model.") or ""),
        optimizer_prefix=str(doc.get("optimizer_prefix", "optim.state.")),
        output_format=_choice("output_format", doc.get("output_format", "stashpoint"), OutputFormat),
        max_shard_size=parse_size(doc.get("max_shard_size", 5 * 10**9), "max_shard_size"),
        device=str(doc.get("device", "cpu")),
        evaluate=None if doc.get("evaluate") is None else str(doc["evaluate"]),
        verify=bool(doc.get("verify", True)),
        _spec=spec,
    )
    _check_counts(cfg, spec)
    _check_values(cfg)
    return cfg


def _choice(key: str, value: object, vocabulary: object, none_ok: bool = False) -> str | None:
    """``vocab.choose``, reported as a configuration error of the merge."""
    if value is None and none_ok:
        return None
    try:
        return choose(key, value, vocabulary)
    except InvalidOptionError as exc:
        raise MergeConfigError(str(exc)) from exc


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _without_base(models: tuple[ModelSpec, ...], base: str | None, spec: MethodSpec) -> tuple[ModelSpec, ...]:
    """mergekit lists the base under ``models`` too (SLERP, model stock, TIES...): it is the base only."""
    if base is None or spec.needs_base is False or not any(_same_path(m.path, base) for m in models):
        return models
    if spec.base_listed == "refused":
        raise MergeConfigError(f"{spec.name}: base_model {base} must not also be listed under models")
    return tuple(m for m in models if not _same_path(m.path, base))


def _check_counts(cfg: MergeConfig, spec: MethodSpec) -> None:
    n = len(cfg.models)
    if spec.needs_base is True and cfg.base_model is None:
        raise MergeConfigError(f"{spec.name}: base_model is required")
    if spec.needs_base is False and cfg.base_model is not None:
        raise MergeConfigError(f"{spec.name}: takes no base_model (list every input under models)")
    if spec.total_inputs is not None:
        if n + (cfg.base_model is not None) != spec.total_inputs:
            raise MergeConfigError(
                f"{spec.name} takes exactly {spec.total_inputs} inputs, base_model counted "
                f"(base_model + {spec.total_inputs - 1}, or {spec.total_inputs} models); got "
                f"{n} model(s){' and a base_model' if cfg.base_model is not None else ''}"
            )
        return
    if n < spec.min_models:
        raise MergeConfigError(f"{spec.name}: needs at least {spec.min_models} model(s), got {n}")
    if spec.max_models is not None and n > spec.max_models:
        raise MergeConfigError(f"{spec.name}: takes at most {spec.max_models} model(s), got {n}")


def _check_values(cfg: MergeConfig) -> None:
    """Types and ranges of the parameters every method shares."""
    for i in range(len(cfg.models)):
        p = cfg.model_params(i)
        where = f"{cfg.method}: models[{i}] ({cfg.models[i].path})"
        for key, value in p.items():
            default = cfg.spec.defaults.get(key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise MergeConfigError(f"{where}: {key} must be true or false, not {value!r}")
            if isinstance(default, int | float) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise MergeConfigError(f"{where}: {key} must be a number, not {value!r}")
            if isinstance(default, str) and not isinstance(value, str):
                raise MergeConfigError(f"{where}: {key} must be a string, not {value!r}")
        if "density" in p and not 0.0 <= float(p["density"]) <= 1.0:
            raise MergeConfigError(f"{where}: density must be in [0, 1], not {p['density']}")
        if "weight" in p and (isinstance(p["weight"], bool) or not isinstance(p["weight"], int | float)):
            raise MergeConfigError(f"{where}: weight must be a number, not {p['weight']!r}")
        if cfg.spec.check is not None:
            cfg.spec.check(p, where)


def load_config(path: str | os.PathLike) -> dict[str, object]:
    """Read a YAML (or JSON) merge configuration file into a plain mapping."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise MergeConfigError(f"cannot read merge configuration {path}: {exc}") from exc
    if path.endswith(".json"):
        import json

        doc = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise MergeConfigError(
                f"{path}: reading YAML needs pyyaml (pip install 'stashpoint[merge]'); JSON works without it"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergeConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise MergeConfigError(f"{path}: the configuration must be a mapping at the top level")
    return doc
