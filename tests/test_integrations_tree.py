"""What the framework adapters share: checkpoint dicts stored without a template, RNG states."""

from __future__ import annotations

import collections
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import stashpoint
from stashpoint.errors import InvalidStateError, MissingKeyError
from stashpoint.format.records import ObjectRecord, records_of
from stashpoint.integrations.rng import capture_rng, restore_rng
from stashpoint.integrations.tree import load_tree, save_tree


def lightning_like() -> dict:
    return {
        "epoch": 3,
        "state_dict": collections.OrderedDict(w=torch.randn(2, 3), b=torch.zeros(3, dtype=torch.bfloat16)),
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(2, 3)}},
                "param_groups": [{"betas": (0.9, 0.999), "params": [0, 1], "lr": 0.1}],
            }
        ],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(math.inf), "dir": "d"}},
        "pair": (torch.arange(3), "tag"),
        "odd": {(1, 2): b"\x00\xff", "nan": float("nan")},
    }


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a_checkpoint_dict_comes_back_from_the_path_alone(tmp_path):
    tree = lightning_like()
    save_tree(tree, tmp_path / "c")
    back = load_tree(tmp_path / "c")
    assert same(tree, back)
    assert type(back["state_dict"]) is dict  # mappings come back as plain dicts
    names = set(stashpoint.read_index(tmp_path / "c").items)
    assert {"state_dict.w", "optimizer_states.0.state.0.exp_avg", "pair.0"} <= names


def test_values_json_cannot_hold_are_refused_where_they_are_unless_pickle_is_allowed(tmp_path):
    tree = {"hyper_parameters": {"act": torch.nn.ReLU}, "w": torch.ones(1)}
    with pytest.raises(InvalidStateError, match=r"c: \['hyper_parameters', 'act'\]: a type .*allow_pickle"):
        save_tree(tree, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    save_tree(tree, tmp_path / "c", allow_pickle=True)
    assert load_tree(tmp_path / "c", allow_pickle=True)["hyper_parameters"]["act"] is torch.nn.ReLU


def test_tensors_whose_keys_join_to_one_name_are_refused(tmp_path):
    with pytest.raises(InvalidStateError, match="share the name 'a.0'"):
        save_tree({"a": {0: torch.ones(1), "0": torch.zeros(1)}}, tmp_path / "c")


def test_a_checkpoint_not_written_as_a_tree_is_named(tmp_path):
    stashpoint.save({"w": torch.ones(2)}, tmp_path / "plain")
    with pytest.raises(MissingKeyError, match="plain: key 'structure' .*not a checkpoint written by"):
        load_tree(tmp_path / "plain")


def test_rng_states_round_trip_through_a_checkpoint_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    stashpoint.save({"rng": stashpoint.PerRank(capture_rng())}, tmp_path / "c")
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    target = {"rng": stashpoint.PerRank(capture_rng())}
    stashpoint.load(target, tmp_path / "c")
    restore_rng(target["rng"].value)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])
    records = list(records_of(stashpoint.read_index(tmp_path / "c").items.values()))
    assert not any(getattr(r, "pickled", False) for r in records)
    assert any(isinstance(r, ObjectRecord) and r.encoding == "json" for r in records)


def test_importing_stashpoint_imports_no_adapter():
    code = "import sys, stashpoint; print([m for m in sys.modules if m.startswith('stashpoint.integ')])"
    run = dict(capture_output=True, text=True, check=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert out.stdout.strip() == "[]"
