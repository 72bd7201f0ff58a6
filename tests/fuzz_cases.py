"""Small real checkpoints and seeded corruptions of them, for the fuzz suite.

Originals: stashpoint saves from one process and from a 2-rank gloo group, a PyTorch
DCP checkpoint and HF safetensors directories (one file, and sharded with an index).
A :class:`Case` names an original, a file in it, a corruption kind and a seed; it is
cheap to list, and :func:`materialize` writes it into a directory, so every case can
be reproduced from its id alone.  ``tests/fuzz_run.py`` runs the operations on them.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from dataclasses import dataclass, replace
from typing import Literal

import torch

import stashpoint
from fuzz_json import HF_INDEX, emit, get, mutate_json, nodes, set_at

Fmt = Literal["stashpoint", "dcp", "hf"]

#: corruption kinds; the deterministic ones are applied once per file of every original
BYTE_KINDS = ("bitflip", "truncate", "append")
ONCE_KINDS = ("delete", "fifo", "directory", "symlink_out")
JSON_KINDS = (
    "json_type",
    "json_number",
    "json_nesting",
    "json_unicode",
    "json_duplicate",
    "json_nonfinite",
    "json_drop",
)
PATH_KINDS = ("path_trick", "oversized")
KINDS = ("none", *ONCE_KINDS, *BYTE_KINDS, *JSON_KINDS, *PATH_KINDS)


@dataclass(frozen=True)
class Original:
    name: str
    fmt: Fmt
    path: str
    world_size: int = 1


@dataclass(frozen=True)
class Case:
    original: str
    file: str
    kind: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.original}:{self.file}:{self.kind}:{self.seed}"


# --- the states that are saved --------------------------------------------------------------


def make_model(seed: int) -> torch.nn.Module:
    """Two linear layers (the second in bf16) and an empty buffer."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].to(torch.bfloat16)
    model.register_buffer("empty", torch.zeros(0, 3))
    return model


def make_state(seed: int, rank: int = 0) -> dict:
    """A training state: module, Adam after one step, plain and per-rank values."""
    model = make_model(seed)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3 * (seed + 1))
    torch.manual_seed(seed)
    model[1](model[0](torch.randn(2, 3)).bfloat16()).float().sum().backward()
    optim.step()
    return {
        "model": model,
        "optim": optim,
        "loader": {"step": 7 + seed, "milestones": [1, 2.5, "x"], "pair": (1, 2), "raw": b"ab"},
        "rng": stashpoint.PerRank(torch.arange(3) + 10 * rank + seed),
        "epoch": stashpoint.PerRank({"rank": rank, "seen": [rank] * 2, "seed": seed}),
        "lr": 0.5 + seed,
        "name": "café ✓",
    }


def save_ranks(rank: int, world_size: int, path: str) -> None:
    """A rank's part of the 2-rank save (a RankPool task)."""
    stashpoint.save(make_state(0, rank), path, step=3)


def save_dcp(path: str) -> None:
    import torch.distributed.checkpoint as dcp

    model = make_model(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "extra": {"step": 3}}, checkpoint_id=path)


def save_hf(path: str, sharded: bool) -> None:
    from safetensors.torch import save_file

    os.makedirs(path)
    sd = {k: v.contiguous() for k, v in make_model(0).state_dict().items()}
    if not sharded:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    with open(os.path.join(path, HF_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


def build_originals(root: str, two_ranks) -> dict[str, Original]:
    """Write every original under ``root``; ``two_ranks(fn, path)`` runs fn on 2 ranks."""
    os.makedirs(root, exist_ok=True)
    out = {
        "sp1": Original("sp1", "stashpoint", os.path.join(root, "sp1")),
        "sp2": Original("sp2", "stashpoint", os.path.join(root, "sp2"), world_size=2),
        "dcp": Original("dcp", "dcp", os.path.join(root, "dcp")),
        "hf1": Original("hf1", "hf", os.path.join(root, "hf1")),
        "hf2": Original("hf2", "hf", os.path.join(root, "hf2")),
    }
    stashpoint.save(make_state(0), out["sp1"].path, step=1)
    two_ranks(save_ranks, out["sp2"].path)
    save_dcp(out["dcp"].path)
    save_hf(out["hf1"].path, sharded=False)
    save_hf(out["hf2"].path, sharded=True)
    return out


def make_canary(root: str, originals: dict[str, Original]) -> str:
    """Copies of every original's files outside any checkpoint; reading one is an escape."""
    canary = os.path.join(root, "canary")
    for orig in originals.values():
        shutil.copytree(orig.path, os.path.join(canary, orig.name))
    return canary


def files_of(orig: Original) -> list[str]:
    return sorted(os.listdir(orig.path))


# --- listing cases ---------------------------------------------------------------------------


def file_role(name: str) -> str:
    if name.endswith(".json"):
        return "json"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name == ".metadata":
        return "pickle"
    return "data"


def kinds_for(role: str) -> tuple[str, ...]:
    extra = {"json": JSON_KINDS + PATH_KINDS, "safetensors": JSON_KINDS + ("oversized",)}
    return BYTE_KINDS + extra.get(role, PATH_KINDS if role == "pickle" else ())


def list_cases(originals: dict[str, Original], seed: int, per_kind: int) -> list[Case]:
    """Every deterministic case once, and ``per_kind`` seeded cases per (file, kind)."""
    rng = random.Random(seed)
    cases = [Case(o.name, "-", "none", 0) for o in originals.values()]
    for orig in originals.values():
        for file in files_of(orig):
            cases += [Case(orig.name, file, kind, 0) for kind in ONCE_KINDS]
            for kind in kinds_for(file_role(file)):
                cases += [Case(orig.name, file, kind, rng.randrange(1 << 31)) for _ in range(per_kind)]
    return cases


def fast_subset(originals: dict[str, Original], cases: list[Case], seed: int) -> list[Case]:
    """One case per (format, file role, kind), drawn in a seeded order, and the originals."""
    shuffled = list(cases)
    random.Random(seed).shuffle(shuffled)
    seen: set[tuple] = set()
    keep = [c for c in cases if c.kind == "none"]
    for c in shuffled:
        key = (originals[c.original].fmt, file_role(c.file), c.kind)
        if c.kind != "none" and key not in seen:
            seen.add(key)
            keep.append(c)
    return keep


# --- applying a case -------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """What a corruption did: a description and whether it only touched tensor payload."""

    detail: str
    payload_only: bool = False


def materialize(case: Case, orig: Original, dst: str, canary: str, payload: dict[str, list]) -> Applied:
    """Copy ``orig`` to ``dst`` and corrupt it as ``case`` says.

    ``payload`` maps each file to the byte ranges holding tensor elements (from the
    original's index), to tell flips that no checksum-less format can notice.
    """
    shutil.copytree(orig.path, dst, symlinks=True)
    if case.kind == "none":
        return Applied("unchanged")
    rng = random.Random(case.seed)
    target = os.path.join(dst, case.file)
    outside = os.path.join(canary, orig.name, case.file)
    if case.kind in ONCE_KINDS:
        return _once(case.kind, target, outside)
    data = open(target, "rb").read()
    if case.kind in BYTE_KINDS:
        return _bytes(case.kind, rng, target, data, payload.get(case.file, []))
    role = file_role(case.file)
    if role == "pickle":
        return _dcp_metadata(case.kind, rng, target, data, os.path.join(canary, orig.name), dst)
    if case.kind == "oversized" and role == "safetensors":
        return _oversized_safetensors(rng, target, data)
    return _json_file(case.kind, rng, target, data, role, os.path.join(canary, orig.name), dst)


def _once(kind: str, target: str, outside: str) -> Applied:
    os.unlink(target)
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        os.mkdir(target)
    elif kind == "symlink_out":
        os.symlink(outside, target)
    return Applied(kind)


def _bytes(kind: str, rng: random.Random, target: str, data: bytes, ranges: list) -> Applied:
    if kind == "bitflip":
        pos = rng.randrange(len(data))
        bit = rng.randrange(8)
        data = data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]
        inside = any(lo <= pos < hi for lo, hi in ranges)
        out, applied = data, Applied(f"flip bit {bit} of byte {pos}", payload_only=inside)
    elif kind == "truncate":
        n = rng.choice([0, 1, 7, 8, rng.randrange(len(data)), len(data) - 1])
        out, applied = data[:n], Applied(f"truncate to {n} of {len(data)}")
    else:
        junk = rng.choice([b"\0", b" ", b"x" * 100, os.urandom(rng.randrange(1, 64))])
        out, applied = data + junk, Applied(f"append {len(junk)} bytes")
    with open(target, "wb") as f:
        f.write(out)
    return applied


def _file_fields(doc: object, role: str) -> list[tuple]:
    """Paths of the values that name files: our chunks' ``file``, HF's weight_map."""
    return [p for p in nodes(doc) if p and (p[-1] == "file" or (len(p) == 2 and p[0] == "weight_map"))]


def _path_trick(rng: random.Random, name: str, outside_dir: str, ckpt: str) -> str:
    outside = os.path.join(outside_dir, os.path.basename(name))
    return rng.choice(
        (
            outside,
            os.path.relpath(outside, ckpt),
            "sub/../" + os.path.relpath(outside, ckpt),
            "..",
            ".",
            "",
            "/",
            "/etc/passwd",
            name + "/",
            name + "\0",
            "..\\" + name,
            "index.json",
        )
    )


def _json_file(kind: str, rng, target: str, data: bytes, role: str, outside_dir: str, ckpt: str) -> Applied:
    if role == "safetensors":
        n = struct.unpack("<Q", data[:8])[0]
        text, body = data[8 : 8 + n], data[8 + n :]
    else:
        text, body = data, b""
    doc = json.loads(text)
    if kind == "path_trick":
        fields = _file_fields(doc, role) or [("__nothing__",)]
        path = rng.choice(fields)
        old = get(doc, path) if path != ("__nothing__",) else "x"
        new = _path_trick(rng, old, outside_dir, ckpt)
        if path == ("__nothing__",):
            return Applied("no file field")
        doc, detail, ascii_only = set_at(doc, path, new), f"{list(path)} = {new!r}", True
    elif kind == "oversized":
        nums = [p for p in nodes(doc) if type(get(doc, p)) is int] or [()]
        path, new = rng.choice(nums), rng.choice((3 << 30, 1 << 40, 2**63 - 1, -(3 << 30)))
        doc, detail, ascii_only = set_at(doc, path, new), f"{list(path)} = {new}", True
    else:
        doc, detail, ascii_only = mutate_json(kind, rng, doc)
    out = emit(doc, ascii_only).encode("utf-8", "surrogatepass")
    if role == "safetensors":
        out = out.ljust(n, b" ") if len(out) <= n else out.ljust(-(-(len(out) + 8) // 8) * 8 - 8, b" ")
        out = struct.pack("<Q", len(out)) + out + body
    with open(target, "wb") as f:
        f.write(out)
    return Applied(detail)


def _oversized_safetensors(rng: random.Random, target: str, data: bytes) -> Applied:
    claim = rng.choice((3 << 30, 1 << 40, 2**64 - 1, len(data)))
    keep = rng.choice((10, len(data)))
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", claim) + data[8:keep])
    return Applied(f"header claims {claim} bytes, file {max(keep, 8)} bytes")


# --- DCP's pickled metadata ---------------------------------------------------------------------


def _dcp_metadata(kind: str, rng, target: str, data: bytes, outside_dir: str, ckpt: str) -> Applied:
    """Rewrite DCP's ``.metadata`` (the harness trusts its own pickle; the library must not)."""
    meta = pickle.loads(data)
    entries = sorted(meta.storage_data, key=str)
    key = rng.choice(entries)
    info = meta.storage_data[key]
    if kind == "path_trick":
        new = _path_trick(rng, info.relative_path, outside_dir, ckpt)
        meta.storage_data[key] = replace(info, relative_path=new)
        detail = f"{key.fqn} relative_path = {new!r}"
    else:
        field = rng.choice(("length", "offset"))
        value = rng.choice((1 << 30, 3 << 30, 2**63 - 1, -1, -(1 << 30)))
        meta.storage_data[key] = replace(info, **{field: value})
        detail = f"{key.fqn} {field} = {value}"
    with open(target, "wb") as f:
        pickle.dump(meta, f)
    return Applied(detail)
