"""Plain Python values as JSON, exactly.

Most non-tensor state (data-loader positions, hyper-parameters, counters) is
JSON already.  A few common Python shapes are not, so they are written as
one-key objects whose key starts with ``$``:

==================  =====================================
Python              JSON
==================  =====================================
``(1, 2)``          ``{"$tuple": [1, 2]}``
``{1: "a"}``        ``{"$dict": [[1, "a"]]}`` (any dict whose keys are not all
                    strings, or that has a key starting with ``$``)
``float("nan")``    ``{"$float": "nan"}`` (also ``"inf"``, ``"-inf"``)
``b"ab"``           ``{"$bytes": "YWI="}`` (base64)
==================  =====================================

Anything else (class instances, sets, ...) is not representable and is stored
as pickle, which is only read back on an explicit opt-in.
"""

from __future__ import annotations

import base64
import math

from stashpoint.format.index import JSONValue


class NotRepresentable(Exception):
    """The value has no exact JSON form."""


def to_json(value: object) -> JSONValue:
    t = type(value)
    if t in (type(None), bool, int, str):
        return value
    if t is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if t is list:
        return [to_json(v) for v in value]
    if t is tuple:
        return {"$tuple": [to_json(v) for v in value]}
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: to_json(v) for k, v in value.items()}
        return {"$dict": [[to_json(k), to_json(v)] for k, v in value.items()]}
    if t is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    raise NotRepresentable(t.__name__)


def from_json(value: JSONValue) -> object:
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key == "$tuple":
            return tuple(from_json(v) for v in inner)
        if key == "$dict":
            return {_hashable(from_json(k)): from_json(v) for k, v in inner}
        if key == "$float":
            return float(inner)
        if key == "$bytes":
            return base64.b64decode(inner)
    return {k: from_json(v) for k, v in value.items()}


def _hashable(key: object) -> object:
    return tuple(key) if isinstance(key, list) else key
