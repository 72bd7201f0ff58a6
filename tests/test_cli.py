"""The ``stashpoint`` command: inspect, verify and the demo job, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import stashpoint

CLI = [sys.executable, "-m", "stashpoint.cli.main"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def ckpt(tmp_path) -> str:
    model = torch.nn.Linear(300, 200)
    path = str(tmp_path / "c")
    stashpoint.save(
        {"model": model, "loader": {"pos": 3}, "rng": stashpoint.PerRank(torch.get_rng_state())},
        path,
        step=42,
        metadata={"run": "cli-test"},
    )
    return path


def test_inspect_table_and_json(ckpt):
    out = run("inspect", ckpt).stdout
    assert "model.weight" in out and "float32" in out and "200x300" in out
    assert "step 42" in out and "cli-test" in out
    doc = json.loads(run("inspect", ckpt, "--json").stdout)
    names = {r["name"]: r for r in doc["items"]}
    assert names["model.weight"]["shape"] == [200, 300]
    assert names["model.weight"]["bytes"] == 200 * 300 * 4
    assert names["rng"]["kind"] == "per-rank tensor"
    assert doc["metadata"]["step"] == 42 and doc["totals"]["tensors"] == 3


def test_verify_passes_then_catches_a_bit_flip(ckpt):
    assert "OK" in run("verify", ckpt).stdout
    index = stashpoint.read_index(ckpt)
    chunk = index.items["model.weight"].chunks[0]
    data_file = os.path.join(ckpt, chunk.file)
    with open(data_file, "r+b") as f:
        f.seek(chunk.byte_range[0] + 1000)
        b = f.read(1)
        f.seek(chunk.byte_range[0] + 1000)
        f.write(bytes([b[0] ^ 0x10]))
    proc = run("verify", ckpt, check=False)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stdout and "model.weight" in proc.stdout


def test_errors_are_named_one_line_and_exit_1(tmp_path):
    proc = run("inspect", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 1
    assert "CheckpointNotFoundError" in proc.stderr and "missing" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not proc.stdout
    os.makedirs(tmp_path / "empty")
    proc = run("verify", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 1 and "NotACheckpointError" in proc.stderr and "not a checkpoint" in proc.stderr


def test_demo_job_recovers_from_memory_reshards_and_leaves_no_temporary_files(tmp_path):
    scratch, shm = tmp_path / "tmp", tmp_path / "shm"
    scratch.mkdir()
    shm.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "STASHPOINT_SHM_DIR": str(shm)}
    proc = subprocess.run(
        [*CLI, "demo", "--dir", str(tmp_path / "out"), "--steps", "4", "--save-at", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "recovered from memory and matched the uninterrupted run" in proc.stdout
    assert "resumed from the memory tier at step 3" in proc.stdout
    assert "losses identical to the reference" in proc.stdout and "2 -> 3 ranks" in proc.stdout
    assert os.listdir(scratch) == []
    assert os.listdir(tmp_path / "out") == ["run"]
    assert {"step-000000002", "step-000000004"} <= set(os.listdir(tmp_path / "out" / "run"))
    deadline = time.monotonic() + 30  # the keepers free their memory as they exit
    while os.listdir(shm) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.listdir(shm) == []


def test_report_table_and_timeline(tmp_path):
    from stashpoint.manager import CheckpointManager, SavePolicy

    telemetry = tmp_path / "t.jsonl"
    manager = CheckpointManager(
        tmp_path / "ck", save_policy=SavePolicy(every_steps=1), mode="eager", telemetry_path=str(telemetry)
    )
    for step in (1, 2, 3):
        manager.maybe_save(step, {"w": torch.randn(256, 256), "step": step})
    manager.close()
    manager.load_latest({"w": torch.zeros(256, 256), "step": 0})
    out = run("report", str(telemetry), "--plot", str(tmp_path / "t.png")).stdout
    assert out.count("save ") == 3 and "load " in out and "eager" in out
    assert "training stall median" in out
    png = (tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_inspect_names_against_another_checkpoint_and_recorded_layouts(tmp_path):
    stage = torch.nn.Module()
    stage.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
    laid = str(tmp_path / "stage")
    layout = stashpoint.StageLayout(layers_key="layers", first_layer=2, num_layers=2)
    stashpoint.save({"model": stashpoint.WithLayout(stage, layout)}, laid)
    compiled = str(tmp_path / "compiled")
    stashpoint.save({"model": {f"_orig_mod.{k}": v for k, v in stage.state_dict().items()}}, compiled)
    wrapped = str(tmp_path / "wrapped")
    torch.save(
        {f"_orig_mod.layers.{i}.{p}": torch.zeros(2, 2) for i in (2, 5) for p in ("weight",)},
        tmp_path / "w.pt",
    )
    stashpoint.convert(str(tmp_path / "w.pt"), wrapped, to="stashpoint")  # names gain "model."
    out = run("inspect", laid).stdout
    assert "rank 0 saved model.layers entries 0-1 as [2, 3] (stage)" in out
    out = run("inspect", wrapped, "--names-against", laid).stdout
    assert "names against" in out
    assert "1 unexpected: model.layers.5.weight" in out
    assert "3 missing: model.layers.2.bias, model.layers.3.bias, model.layers.3.weight" in out
    assert "1 renamed: model._orig_mod.layers.2.weight -> model.layers.2.weight" in out
    doc = json.loads(run("inspect", laid, "--json", "--names-against", compiled).stdout)
    assert doc["metadata"]["layouts"] == [
        {"rank": 0, "prefix": "model", "kind": "stage", "key": "layers", "global_ids": [2, 3]}
    ]
    assert doc["names_against"]["missing"] == ["model.layers.0.bias", "model.layers.0.weight"] + [
        "model.layers.1.bias",
        "model.layers.1.weight",
    ]
