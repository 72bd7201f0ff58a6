"""JSON corruptions for the fuzz suite, and a strict reader of HF safetensors directories.

The corruptions work on the parsed document: pick a node, replace it, and write the
text back with :func:`emit`, which can also repeat members and splice raw text (deep
nesting, ``NaN``).  :func:`hf_self_consistent` tells the changes to an HF directory
that no reader can notice (the format has no checksums) from those it must reject.
"""

from __future__ import annotations

import json
import os
import random
import struct

HF_INDEX = "model.safetensors.index.json"


class Raw:
    """Text spliced verbatim into the emitted JSON."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs:
    """An object written member by member, so a member may repeat."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def emit(obj: object, ascii_only: bool = True) -> str:
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        obj = Pairs(list(obj.items()))
    if isinstance(obj, Pairs):
        inner = (f"{json.dumps(k, ensure_ascii=ascii_only)}:{emit(v, ascii_only)}" for k, v in obj.pairs)
        return "{" + ",".join(inner) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(emit(v, ascii_only) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=ascii_only)


def nodes(obj: object, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += nodes(v, (*path, i))
    return out


def get(obj: object, path: tuple) -> object:
    for p in path:
        obj = obj[p]
    return obj


def set_at(obj: object, path: tuple, value: object) -> object:
    if not path:
        return value
    get(obj, path[:-1])[path[-1]] = value
    return obj


WRONG_TYPES = (None, True, 0, -1, 1.5, "", "x", [], {}, [[]], {"$tuple": 1}, {"$bytes": "!!"})
NUMBERS = (-1, -(2**63), 2**63, 2**64 + 1, 10**30, 3 << 30, 1 << 40, 1e308, -1e308, 1.5, 0, 10**400)
UNICODE = ("\ud800", "\u0000", "é", "e\u0301", "\u202e", "\U0001f600", "a/b", "\\", "\udfff x", "\uffff")


def mutate_json(kind: str, rng: random.Random, doc: object) -> tuple[object, str, bool]:
    """Returns (new document, description, emit ascii-only)."""
    paths = nodes(doc)
    path = rng.choice(paths)
    if kind == "json_type":
        new = rng.choice(WRONG_TYPES)
        return set_at(doc, path, new), f"{list(path)} = {new!r}", True
    if kind == "json_number":
        nums = [p for p in paths if type(get(doc, p)) in (int, float)] or paths
        path, new = rng.choice(nums), rng.choice(NUMBERS)
        return set_at(doc, path, Raw(str(new))), f"{list(path)} = {new}", True
    if kind == "json_nonfinite":
        nums = [p for p in paths if type(get(doc, p)) in (int, float)] or paths
        path, new = rng.choice(nums), rng.choice(("NaN", "Infinity", "-Infinity"))
        return set_at(doc, path, Raw(new)), f"{list(path)} = {new}", True
    if kind == "json_nesting":
        depth = rng.choice((64, 1000, 100_000))
        open_, close = rng.choice((("[", "]"), ('{"a":', "}")))
        return (
            set_at(doc, path, Raw(open_ * depth + "1" + close * depth)),
            f"{list(path)} nested {depth}",
            True,
        )
    if kind == "json_unicode":
        return _unicode(rng, doc, paths)
    if kind == "json_duplicate":
        dicts = [p for p in paths if isinstance(get(doc, p), dict) and get(doc, p)] or [()]
        path = rng.choice(dicts)
        pairs = list(get(doc, path).items())
        key = rng.choice(pairs)[0]
        dup = (key, rng.choice((*WRONG_TYPES, pairs[-1][1], 12345)))
        pairs.insert(rng.choice((0, len(pairs))), dup)
        return set_at(doc, path, Pairs(pairs)), f"{list(path)} repeats {key!r}", True
    dicts = [p for p in paths if isinstance(get(doc, p), dict) and get(doc, p)] or [()]
    path = rng.choice(dicts)
    key = rng.choice(list(get(doc, path)))
    del get(doc, path)[key]
    return doc, f"{list(path)} drops {key!r}", True


def _unicode(rng: random.Random, doc: object, paths: list[tuple]) -> tuple[object, str, bool]:
    text = rng.choice(UNICODE)
    strings = [p for p in paths if isinstance(get(doc, p), str)]
    dicts = [p for p in paths if isinstance(get(doc, p), dict) and get(doc, p)]
    if dicts and (not strings or rng.random() < 0.4):
        path = rng.choice(dicts)
        obj = get(doc, path)
        key = rng.choice(list(obj))
        renamed = {(k + text if k == key else k): v for k, v in obj.items()}
        return set_at(doc, path, renamed), f"{list(path)} key {key!r} + {text!r}", rng.random() < 0.5
    path = rng.choice(strings or paths)
    old = get(doc, path)
    new = (old + text) if isinstance(old, str) else text
    return set_at(doc, path, new), f"{list(path)} = {new!r}", rng.random() < 0.5


# --- telling undetectable changes of checksum-less formats -------------------------------------

ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def strict_json(data: bytes) -> object:
    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate member")
        return dict(items)

    def constant(name: str) -> float:
        raise ValueError(name)

    return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _valid_safetensors(path: str) -> set[str]:
    """The tensor names of a safetensors file that a strict reader accepts, else raises."""
    if not os.path.isfile(path):  # a FIFO would block the read: nothing strict accepts it
        raise ValueError("not a regular file")
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    if 8 + n > len(data):
        raise ValueError("header past the end")
    header = strict_json(data[8 : 8 + n])
    header.pop("__metadata__", None)
    spans = []
    for meta in header.values():
        shape, (begin, end) = meta["shape"], meta["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or type(begin) is not int:
            raise ValueError("bad shape or offsets")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * ST_ITEMSIZE[meta["dtype"]]:
            raise ValueError("size")
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError("gap or overlap")
        pos = end
    if pos != len(data) - 8 - n:
        raise ValueError("data section length")
    return set(header)


def hf_self_consistent(path: str) -> bool:
    """An HF directory that a strict reader accepts: a change to it no reader can notice."""
    try:
        index = os.path.join(path, HF_INDEX)
        if not os.path.exists(index):
            _valid_safetensors(os.path.join(path, "model.safetensors"))
            return True
        if not os.path.isfile(index):
            return False
        weight_map = strict_json(open(index, "rb").read())["weight_map"]
        files = set(weight_map.values())
        if not all(isinstance(f, str) and f in os.listdir(path) for f in files):
            return False
        held = {f: _valid_safetensors(os.path.join(path, f)) for f in files}
        return all(name in held[f] for name, f in weight_map.items()) and sum(map(len, held.values())) == len(
            weight_map
        )
    except (ValueError, KeyError, TypeError, AttributeError, OSError, struct.error, UnicodeError):
        return False
    except RecursionError:
        return False
