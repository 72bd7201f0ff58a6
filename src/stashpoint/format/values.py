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

Values are bounded so that every reader can decode them without running out of
stack or time: at most :data:`MAX_DEPTH` levels of JSON arrays and objects, and
ints of at most :data:`MAX_INT_DIGITS` decimal digits.  Anything else (class
instances, sets, deeper or bigger values) is not representable; it can only be
stored as pickle, and only when the caller opts in.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Union

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]

#: JSON arrays and objects nested deeper than this are refused (tags count as levels)
MAX_DEPTH = 64
#: ints with more decimal digits than this are refused (the sign is not a digit)
MAX_INT_DIGITS = 400
_INT_LIMIT = 10**MAX_INT_DIGITS
_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
TAGS = ("$tuple", "$dict", "$float", "$bytes")


class NotRepresentable(Exception):
    """The value has no exact JSON form (the message says why)."""


class MalformedValue(ValueError):
    """Tagged JSON that no writer produces: ``where`` locates it inside the value."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where or 'value'}: {problem}")
        self.where = where
        self.problem = problem


def to_json(value: object, depth: int = 0) -> JSONValue:
    """The tagged JSON form of ``value``; raises NotRepresentable when there is none."""
    t = type(value)
    if t in (type(None), bool, str):
        return value
    if t is int:
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise NotRepresentable(f"an int of more than {MAX_INT_DIGITS} digits")
        return value
    if t is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if depth >= MAX_DEPTH:
        raise NotRepresentable(f"a value nested more than {MAX_DEPTH} levels deep")
    if t is list:
        return [to_json(v, depth + 1) for v in value]
    if t is tuple:
        return {"$tuple": [to_json(v, depth + 2) for v in value]}
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: to_json(v, depth + 1) for k, v in value.items()}
        return {"$dict": [[to_json(k, depth + 3), to_json(v, depth + 3)] for k, v in value.items()]}
    if t is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    raise NotRepresentable(f"a {t.__name__}")


def from_json(value: JSONValue, where: str = "", depth: int = 0) -> object:
    """Decode tagged JSON; raises MalformedValue on anything a writer never produces."""
    t = type(value)
    if t is int and not -_INT_LIMIT < value < _INT_LIMIT:
        raise MalformedValue(where, f"an int of more than {MAX_INT_DIGITS} digits")
    if t is float and not math.isfinite(value):
        raise MalformedValue(where, "a non-finite number")
    if t not in (list, dict):
        if t not in (type(None), bool, int, float, str):
            raise MalformedValue(where, f"a {t.__name__}, which JSON does not have")
        return value
    if depth >= MAX_DEPTH:
        raise MalformedValue(where, f"nested more than {MAX_DEPTH} levels deep")
    if t is list:
        return [from_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key in TAGS:
            return _from_tag(key, inner, f"{where}.{key}", depth + 1)
    for key in value:
        if key.startswith("$"):
            raise MalformedValue(where, f"unknown tag {key!r}")
    return {k: from_json(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}


def _from_tag(tag: str, inner: JSONValue, where: str, depth: int) -> object:
    if tag == "$float":
        if not isinstance(inner, str) or inner not in _FLOAT_WORDS:
            raise MalformedValue(where, 'must be "nan", "inf" or "-inf"')
        return _FLOAT_WORDS[inner]
    if tag == "$bytes":
        return _bytes(inner, where)
    if not isinstance(inner, list):
        raise MalformedValue(where, "must be a list")
    if tag == "$tuple":
        return tuple(from_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(inner))
    out: dict = {}
    for i, pair in enumerate(inner):
        if not isinstance(pair, list) or len(pair) != 2:
            raise MalformedValue(f"{where}[{i}]", "must be a [key, value] pair")
        key = from_json(pair[0], f"{where}[{i}][0]", depth + 2)
        key = tuple(key) if isinstance(key, list) else key
        try:
            hash(key)
        except TypeError:
            raise MalformedValue(f"{where}[{i}][0]", "is not a usable dict key") from None
        if key in out:
            raise MalformedValue(f"{where}[{i}][0]", "repeats an earlier key")
        out[key] = from_json(pair[1], f"{where}[{i}][1]", depth + 2)
    return out


def _bytes(inner: JSONValue, where: str) -> bytes:
    if not isinstance(inner, str):
        raise MalformedValue(where, "must be a base64 string")
    try:
        data = base64.b64decode(inner, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedValue(where, "is not valid base64") from None
    if base64.b64encode(data).decode() != inner:
        raise MalformedValue(where, "is not base64 in its standard padded form")
    return data


def check_plain(value: JSONValue, where: str = "", depth: int = 0) -> None:
    """Untagged JSON (the caller's metadata): bounded depth and ints, finite numbers."""
    t = type(value)
    if t in (list, dict):
        if depth >= MAX_DEPTH:
            raise MalformedValue(where, f"nested more than {MAX_DEPTH} levels deep")
        pairs = enumerate(value) if t is list else value.items()
        for k, v in pairs:
            check_plain(v, f"{where}[{k!r}]", depth + 1)
    elif t in (int, float):
        from_json(value, where)
    elif t not in (type(None), bool, str):
        raise MalformedValue(where, f"a {t.__name__}, which JSON does not have")
