"""The table of merge methods, filled by decorators in the method modules.

Three kinds of method share one registry:

* ``linear``: a function of the inputs' parameters and metadata returning one
  coefficient per model (and one for the base model); every tensor is then a
  streamed linear combination (averages, EMA, LAWA, WSM, task arithmetic...);
* ``tensor``: a function applied to each tensor of all inputs at once (TIES, DARE,
  SLERP, model stock, curvature-weighted deltas);
* ``search``: a search over coefficient vectors whose fitness is a user evaluation
  (greedy soup, LCSC); the winner is merged like a ``linear`` method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stashpoint.errors import MergeConfigError
from stashpoint.vocab import BaseListed, MergeKind

ParamValue = bool | int | float | str
Params = Mapping[str, ParamValue]

LINEAR: MergeKind = "linear"
TENSOR: MergeKind = "tensor"
SEARCH: MergeKind = "search"


@dataclass(frozen=True)
class MethodSpec:
    """A method and the rules its configuration must follow, declared where it is registered."""

    name: str
    kind: MergeKind
    fn: Callable
    #: ``True``: a base model is required; ``None``: optional; ``False``: not accepted
    needs_base: bool | None
    defaults: Params
    #: parameters a model entry may set for itself (they may also be given globally)
    model_params: frozenset[str]
    min_models: int = 1
    max_models: int | None = None
    needs_moments: bool = False
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())
    #: exactly this many inputs, the base counted (slerp: 2), or None
    total_inputs: int | None = None
    #: the base model also listed under ``models``: dropped from them (mergekit), or refused
    base_listed: BaseListed = "dropped"
    #: with ``missing: union``, a tensor must still be in every input
    every_input: bool = False
    #: checks of the resolved parameters of one model (raise MergeConfigError)
    check: Callable[[Params, str], None] | None = None


METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    kind: MergeKind,
    needs_base: bool | None = False,
    defaults: Mapping[str, ParamValue] | None = None,
    model_params: tuple[str, ...] = (),
    min_models: int = 1,
    max_models: int | None = None,
    needs_moments: bool = False,
    aliases: tuple[str, ...] = (),
    total_inputs: int | None = None,
    base_listed: BaseListed = "dropped",
    every_input: bool = False,
    check: Callable[[Params, str], None] | None = None,
) -> Callable[[Callable], Callable]:
    """Register the decorated function as merge method ``name`` (and its aliases)."""

    def wrap(fn: Callable) -> Callable:
        spec = MethodSpec(
            name=name,
            kind=kind,
            fn=fn,
            needs_base=needs_base,
            defaults=MappingProxyType(dict(defaults or {})),
            model_params=frozenset(model_params),
            min_models=min_models,
            max_models=max_models,
            needs_moments=needs_moments,
            summary=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            aliases=aliases,
            total_inputs=total_inputs,
            base_listed=base_listed,
            every_input=every_input,
            check=check,
        )
        for key in (name, *aliases):
            if key in METHODS:
                raise RuntimeError(f"merge method {key!r} registered twice")
            METHODS[key] = spec
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; imports the method modules on first use."""
    from stashpoint.merging import geometric, methods, search, weights  # noqa: F401  (they register themselves)

    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise MergeConfigError(f"unknown merge_method {name!r}; known: {known}") from None


def method_names() -> list[str]:
    get_method("linear")
    return sorted(METHODS)
