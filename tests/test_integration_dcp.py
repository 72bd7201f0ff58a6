"""PyTorch DCP's own API writing and reading stashpoint checkpoints through our
StorageWriter/StorageReader: FSDP2 on real gloo rank pools at world sizes 2 and 3, and the
single-process rules (pickle only on request, plain values grouped as stashpoint groups them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import stashpoint
from stashpoint.cli.main import main as cli
from stashpoint.errors import InvalidStateError, PickleNotAllowedError
from stashpoint.integrations.dcp import StashpointReader, StashpointWriter
from stashpoint.integrations.dcp_values import Leaf, dcp_leaves, group_values
from test_interop_dist import flat_tensors, same_bits

import integration_cases


def tensors(state: dict) -> dict[str, torch.Tensor]:
    return flat_tensors({k: v for k, v in state.items() if k in ("model", "optim")})


def test_dcp_save_at_2_loads_with_stashpoint_at_3_and_dcp_load_at_2_back(pools, tmp_path, capsys):
    path, async_path = str(tmp_path / "dcp-written"), str(tmp_path / "dcp-async")
    saved = pools(2).run(integration_cases.dcp_saves, path, async_path)[0]
    reference = tensors(saved)
    assert any(k.endswith("exp_avg_sq") for k in reference)

    # an ordinary stashpoint checkpoint: verified, plain values grouped as stashpoint does
    for p in (path, async_path):
        assert cli(["verify", p]) == 0
    assert "index: checksum verified" in capsys.readouterr().out
    index = stashpoint.read_index(path)
    assert (index.metadata.world_size, index.metadata.step) == (2, integration_cases.TRAIN["step"])
    assert {"train", "optim.param_groups"} <= set(index.items)
    assert not any(k.startswith("train.") or k.startswith("optim.param_groups.") for k in index.items)

    # stashpoint.load at world size 3 into FSDP2, bit-exact; the async save holds the state
    # of the moment it was started, not the step taken before it was waited for
    for p in (path, async_path):
        got = pools(3).run(integration_cases.stashpoint_loads, p)[0]
        same_bits(tensors(got["state"]), reference)
        assert got["train"] == integration_cases.TRAIN

    # and DCP reads it back through StashpointReader at world size 2
    got = pools(2).run(integration_cases.dcp_loads, path)[0]
    same_bits(tensors(got["state"]), reference)
    assert got["train"] == integration_cases.TRAIN


def test_stashpoint_save_at_3_loads_with_dcp_at_2_and_a_flipped_byte_changes_nothing(pools, tmp_path):
    path = str(tmp_path / "sp-written")
    pools(3).run(integration_cases.stashpoint_saves, path)
    saved = {k: v for k, v in stashpoint.load_full(path).items() if isinstance(v, torch.Tensor)}

    got = pools(2).run(integration_cases.dcp_loads, path)[0]
    same_bits(tensors(got["state"]), saved)
    assert got["train"] == integration_cases.TRAIN

    # one byte of one chunk flipped: the rank that reads it names the checksum, the other
    # learns that it failed, and no rank's model or optimizer changed
    chunk = stashpoint.read_index(path).items["model.0.weight"].chunks[0]
    with open(os.path.join(path, chunk.file), "r+b") as f:
        f.seek(chunk.byte_range[0] + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    outcome = pools(2).run(integration_cases.dcp_loads, path)
    errors = outcome[0]["errors"]
    assert "ChecksumMismatchError" in errors.values()
    assert set(errors.values()) <= {"ChecksumMismatchError", "RemoteRankError"} and len(errors) == 2
    assert all(r["unchanged"] for r in outcome)


def _model_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(3, 2).state_dict()}


def test_values_json_cannot_hold_are_pickled_only_on_request(tmp_path):
    warnings.simplefilter("ignore")  # dcp warns that no process group is initialised
    state = {**_model_state(0), "extra": {"tags": {"b", "a"}}}
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=StashpointWriter(tmp_path / "refused"))
    ((exc, _),) = info.value.failures.values()
    assert isinstance(exc, InvalidStateError) and "'extra.tags'" in str(exc) and "allow_pickle" in str(exc)
    assert not (tmp_path / "refused").exists()

    path = tmp_path / "pickled"
    dcp.save(state, storage_writer=StashpointWriter(path, allow_pickle=True))
    assert stashpoint.read_index(path).items["extra.tags"].encoding == "pickle"
    target = {**_model_state(1), "extra": {"tags": set()}}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=StashpointReader(path))
    ((exc, _),) = info.value.failures.values()
    assert isinstance(exc, PickleNotAllowedError)
    assert torch.equal(target["model"]["weight"], _model_state(1)["model"]["weight"])  # nothing applied
    dcp.load(target, storage_reader=StashpointReader(path, allow_pickle=True))
    assert target["extra"]["tags"] == {"a", "b"}
    assert torch.equal(target["model"]["weight"], state["model"]["weight"])
    # a pickled value keeps the name DCP gave it (its group cannot be one JSON item)
    assert stashpoint.load_full(path, ["extra.tags"], allow_pickle=True) == {"extra.tags": {"a", "b"}}


def test_existing_checkpoint_is_refused_unless_overwrite(tmp_path):
    warnings.simplefilter("ignore")
    path = tmp_path / "ckpt"
    dcp.save(_model_state(0), storage_writer=StashpointWriter(path, metadata={"run": "a"}))
    with pytest.raises(CheckpointException):
        dcp.save(_model_state(1), storage_writer=StashpointWriter(path))
    assert stashpoint.read_index(path).metadata.user == {"run": "a"}
    dcp.save(_model_state(1), storage_writer=StashpointWriter(path, overwrite=True))
    assert torch.equal(stashpoint.load_full(path)["model.weight"], _model_state(1)["model"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging left behind
    doc = json.loads((path / "index.json").read_text())
    assert doc["metadata"]["user"] == {}


def test_dcp_leaves_and_groups_are_inverse():
    groups = {"train": {"step": 3, "hist": [1.0, 2.0]}, "optim.param_groups": [{"lr": 0.1, "params": ["w"]}]}
    leaves = [  # as DCP flattens them, with their paths in the state dict
        Leaf(fqn="train.step", path=("train", "step"), value=3),
        Leaf(fqn="train.hist", path=("train", "hist"), value=[1.0, 2.0]),
        Leaf(fqn="optim.param_groups.0.lr", path=("optim", "param_groups", 0, "lr"), value=0.1),
        Leaf(fqn="optim.param_groups.0.params", path=("optim", "param_groups", 0, "params"), value=["w"]),
    ]
    tensor_paths = [("optim", "state", "w", "exp_avg")]
    assert group_values(leaves, tensor_paths) == groups
    split = [leaf for name, value in groups.items() for leaf in dcp_leaves(name, value)]
    assert {(f.fqn, repr(f.value)) for f in split} == {(f.fqn, repr(f.value)) for f in leaves}
    # a group that holds a pickled leaf, or that cannot be rebuilt, stays split as DCP names it
    assert group_values(leaves, tensor_paths, opaque=[("train", "blob")])["train.step"] == 3
    assert group_values([Leaf(fqn="x.1.a", path=("x", 1, "a"), value=1)], []) == {"x.1.a": 1}


def test_import_stashpoint_imports_no_adapter():
    code = "import sys, stashpoint; print(sorted(m for m in sys.modules if 'integrations' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
