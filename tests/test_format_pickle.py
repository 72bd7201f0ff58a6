"""No pickle without asking: values JSON cannot hold need ``allow_pickle=True`` at save.

And converting to DCP, which has no per-rank values, names the per-rank items it leaves
out instead of reporting that nothing was left out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stashpoint as sp
from stashpoint import errors
from stashpoint._state.values import encode_object
from stashpoint.convert.dcp import export_dcp
from stashpoint.wrappers import PerRank


class Custom:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom)


NOT_JSON = {"set": {1, 2, 3}, "frozenset": frozenset({"a"}), "object": Custom(), "complex": 1j}


@pytest.mark.parametrize("kind", list(NOT_JSON))
def test_save_refuses_to_pickle_without_opt_in(tmp_path: Path, kind: str) -> None:
    state = {"model": torch.nn.Linear(2, 2), "extra": {"epoch": 3, "seen": NOT_JSON[kind]}}
    with pytest.raises(errors.InvalidStateError) as info:
        sp.save(state, tmp_path / "c")
    msg = str(info.value)
    assert "'extra'" in msg and str(tmp_path / "c") in msg
    assert "allow_pickle=True" in msg and "list" in msg, msg
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging left behind either


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    sp.save({"extra": {"epoch": 1}}, tmp_path / "c")
    with pytest.raises(errors.InvalidStateError):
        sp.save({"extra": {"seen": {1}}}, tmp_path / "c", overwrite=True)
    out = {"extra": None}
    sp.load(out, tmp_path / "c")
    assert out == {"extra": {"epoch": 1}}


def test_save_pickles_with_opt_in_and_load_needs_it_too(tmp_path: Path) -> None:
    state = {"extra": {"seen": {1, 2, 3}, "who": Custom()}}
    sp.save(state, tmp_path / "c", allow_pickle=True)
    assert sp.read_index(tmp_path / "c").items["extra"].encoding == "pickle"
    with pytest.raises(errors.PickleNotAllowedError):
        sp.load({"extra": None}, tmp_path / "c")
    out = {"extra": None}
    sp.load(out, tmp_path / "c", allow_pickle=True)
    assert out == state


def test_async_save_refuses_to_pickle_without_opt_in(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidStateError, match="allow_pickle=True"):
        sp.async_save({"extra": {"seen": {1}}}, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_encode_object() -> None:
    assert encode_object((1, 2), "x") == ("json", b'{"$tuple":[1,2]}')
    with pytest.raises(errors.InvalidStateError, match="'x'.*set"):
        encode_object({1}, "x")
    encoding, payload = encode_object({1}, "x", allow_pickle=True)
    assert encoding == "pickle" and payload.startswith(b"\x80\x04")


def test_export_dcp_names_per_rank_items_left_out(tmp_path: Path) -> None:
    sp.save({"w": torch.arange(4.0), "loader": PerRank({"pos": 5}), "sched": {"lr": 0.1}}, tmp_path / "c")
    summary = export_dcp(tmp_path / "c", tmp_path / "dcp")
    assert summary.skipped == ("loader",) and summary.tensors == 1 and summary.values == 1
    summary = export_dcp(tmp_path / "c", tmp_path / "dcp2", keys=["w"])
    assert summary.skipped == ()
    cli = [
        sys.executable,
        "-m",
        "stashpoint.cli.main",
        "convert",
        str(tmp_path / "c"),
        str(tmp_path / "dcp3"),
    ]
    out = subprocess.run([*cli, "--to", "dcp"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1 items left out" in out.stdout, out.stdout
