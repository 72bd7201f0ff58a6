"""The publisher: races to one path, a full disk, exports that never mix, the writer's protocol.

Disk-full cases run on a real, small tmpfs mounted for the test (``size=`` for space,
``nr_inodes=`` for inodes); where mounting is not allowed they are skipped, and the
``faulty://enospc`` storage of ``test_async_save`` covers the data-file case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stashpoint as sp
from stashpoint import errors
from stashpoint.convert import export_dcp, export_hf
from stashpoint.engine import messages
from stashpoint.engine.records import Chunk, Inline
from stashpoint.engine.writer_client import BackgroundWriter
from stashpoint.format.index import INDEX_FILE
from stashpoint.storage import LocalStorage
from stashpoint.storage.commit import AtomicRenameCommit
from stashpoint.storage.local import rename_path

# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def small_fs(tmp_path: Path):
    """``small_fs(size=..., nr_inodes=...)``: a fresh tmpfs of that size, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str = "4m", nr_inodes: int | None = None) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _loaded(path) -> dict:
    return sp.load_full(path)


# ------------------------------------------------------------------------------------------------ races


def test_rename_without_replace_refuses_an_existing_target(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("new")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("old")
    (tmp_path / "f").write_text("new file")
    (tmp_path / "g").write_text("old file")
    with pytest.raises(FileExistsError):
        rename_path(str(tmp_path / "a"), str(tmp_path / "b"), replace=False)
    with pytest.raises(FileExistsError):
        rename_path(str(tmp_path / "f"), str(tmp_path / "g"), replace=False)
    assert (tmp_path / "b" / "x").read_text() == "old" and (tmp_path / "g").read_text() == "old file"
    rename_path(str(tmp_path / "a"), str(tmp_path / "c"), replace=False)
    assert (tmp_path / "c" / "x").read_text() == "new" and not (tmp_path / "a").exists()


def _race(fn: Callable[[int], None], timeout_s: float) -> tuple[int, BaseException]:
    """Run ``fn(0)`` and ``fn(1)`` from one barrier; exactly one must return: (its number, the
    other's exception)."""
    barrier, outcomes = threading.Barrier(2), [None, None]

    def run(who: int) -> None:
        barrier.wait(timeout_s)
        try:
            fn(who)
            outcomes[who] = "won"
        except BaseException as exc:
            outcomes[who] = exc

    threads = [threading.Thread(target=run, args=(who,)) for who in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert [str(o) for o in outcomes].count("won") == 1, outcomes
    winner = outcomes.index("won")
    return winner, outcomes[1 - winner]


def test_commits_racing_to_one_path_have_exactly_one_winner(tmp_path: Path) -> None:
    """Two staged checkpoints committed to one path at once, without overwrite, 100 times."""
    storage, commit = LocalStorage(), AtomicRenameCommit()
    for round_ in range(100):
        final = str(tmp_path / f"c{round_}")
        stagings = []
        for who in range(2):
            staging = commit.staging_path(storage, final, f"r{who}")
            os.makedirs(staging)
            Path(staging, INDEX_FILE).write_text(str(who))
            stagings.append(staging)
        winner, lost = _race(
            lambda who, final=final, stagings=stagings: commit.commit(
                storage, stagings[who], final, overwrite=False
            ),
            30,
        )
        assert isinstance(lost, errors.CheckpointExistsError) and final in str(lost), repr(lost)
        assert Path(final, INDEX_FILE).read_text() == str(winner)
        commit.abort(storage, stagings[1 - winner], final)
    assert sorted(os.listdir(tmp_path)) == sorted(f"c{i}" for i in range(100))


def test_saves_racing_to_one_path_have_exactly_one_winner(tmp_path: Path) -> None:
    for round_ in range(12):
        path = tmp_path / f"c{round_}"
        states = [{"w": torch.full((1000,), float(who)), "who": who} for who in range(2)]
        winner, lost = _race(lambda who, path=path, states=states: sp.save(states[who], path), 120)
        assert isinstance(lost, errors.CheckpointExistsError) and str(path) in str(lost), repr(lost)
        got = _loaded(path)
        assert got["who"] == winner and torch.equal(got["w"], torch.full((1000,), float(winner)))
    assert sorted(os.listdir(tmp_path)) == sorted(f"c{i}" for i in range(12))  # no debris


# ------------------------------------------------------------------------------------------------ disk full


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_space_for_the_data_file_is_disk_full(small_fs, mode: str) -> None:
    fs = small_fs(size="1m")
    path = fs / "c"
    sp.save({"w": torch.ones(1000)}, path)
    with pytest.raises(errors.DiskFullError) as info:
        big = {"w": torch.zeros(1 << 20)}  # 4 MiB on a 1 MiB filesystem
        if mode == "sync":
            sp.save(big, path, overwrite=True)
        else:
            sp.async_save(big, path, overwrite=True).wait(120)
    assert str(path) in str(info.value) and "data-00000.safetensors" in str(info.value)
    assert torch.equal(_loaded(path)["w"], torch.ones(1000))  # the previous checkpoint is whole
    assert os.listdir(fs) == ["c"]


def test_no_inode_for_the_index_is_disk_full(small_fs) -> None:
    # root, staging directory and data file use the three inodes: index.json gets none
    fs = small_fs(size="4m", nr_inodes=3)
    with pytest.raises(errors.DiskFullError) as info:
        sp.save({"w": torch.zeros(1000)}, fs / "c")
    assert str(fs / "c") in str(info.value) and INDEX_FILE in str(info.value)
    assert os.listdir(fs) == []


def test_no_space_for_an_export_is_disk_full(small_fs, tmp_path: Path) -> None:
    sp.save({"model": {"w": torch.zeros(1 << 20)}}, tmp_path / "src")
    fs = small_fs(size="1m")
    with pytest.raises(errors.DiskFullError):
        export_hf(tmp_path / "src", fs / "hf")
    assert os.listdir(fs) == []


# ------------------------------------------------------------------------------------------------ exports


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    sp.save({"model": {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, "step": 3}, path)
    return path


def _stale_hf_dir(path: Path) -> dict[str, str]:
    path.mkdir()
    old = {
        "model-00001-of-00002.safetensors": "old shard",
        "model-00002-of-00002.safetensors": "old shard",
        "model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}),
    }
    for name, text in old.items():
        (path / name).write_text(text)
    return old


def test_hf_export_refuses_an_existing_directory(source: Path, tmp_path: Path) -> None:
    old = _stale_hf_dir(tmp_path / "hf")
    with pytest.raises(errors.CheckpointExistsError, match=str(tmp_path / "hf")):
        export_hf(source, tmp_path / "hf")
    assert {p.name: p.read_text() for p in (tmp_path / "hf").iterdir()} == old
    assert sorted(os.listdir(tmp_path)) == ["hf", "src"]


def test_hf_export_with_overwrite_replaces_the_directory_whole(source: Path, tmp_path: Path) -> None:
    _stale_hf_dir(tmp_path / "hf")
    export_hf(source, tmp_path / "hf", overwrite=True)
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]  # no old shard, no old index
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3)) and torch.equal(
        tensors["b"], torch.ones(4)
    )
    assert sorted(os.listdir(tmp_path)) == ["hf", "src"]


def test_hf_export_with_a_missing_file_to_copy_leaves_nothing(source: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        export_hf(source, tmp_path / "hf", copy_files=(tmp_path / "no-such-config.json",))
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_dcp_export_refuses_an_existing_directory_and_replaces_it_with_overwrite(
    source: Path, tmp_path: Path
) -> None:
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / "stale.distcp").write_text("old")
    with pytest.raises(errors.CheckpointExistsError):
        export_dcp(source, tmp_path / "dcp")
    assert os.listdir(tmp_path / "dcp") == ["stale.distcp"]
    export_dcp(source, tmp_path / "dcp", overwrite=True)
    assert "stale.distcp" not in os.listdir(tmp_path / "dcp") and ".metadata" in os.listdir(tmp_path / "dcp")
    assert sorted(os.listdir(tmp_path)) == ["dcp", "src"]


# ------------------------------------------------------------------------------------------------ async save


def test_writer_client_keeps_nothing_for_finished_saves(tmp_path: Path) -> None:
    state = {"w": torch.randn(256), "step": 0}
    for i in range(30):
        state["step"] = i
        sp.async_save(state, tmp_path / f"c{i}").wait(120)
    assert BackgroundWriter.get().outstanding == 0
    assert _loaded(tmp_path / "c29")["step"] == 29


def test_done_callback_runs_once_with_the_handle(tmp_path: Path) -> None:
    calls: list = []
    handle = sp.async_save({"w": torch.ones(8)}, tmp_path / "c")
    handle.add_done_callback(lambda h: calls.append((h, h.exception())))
    handle.wait(120)
    handle.add_done_callback(lambda h: calls.append((h, "late")))  # already over: called at once
    assert calls == [(handle, None), (handle, "late")]


def test_done_callback_sees_a_failed_save(tmp_path: Path) -> None:
    calls: list = []
    settled = threading.Event()
    handle = sp.async_save({"w": torch.zeros(1 << 16)}, f"faulty://enospc-1000{tmp_path}/c")
    handle.add_done_callback(lambda h: (calls.append(h.exception()), settled.set()))
    assert settled.wait(120)
    assert len(calls) == 1 and isinstance(calls[0], errors.DiskFullError)
    assert not (tmp_path / "c").exists()


def test_bad_mode_and_if_busy_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidOptionError, match="mode"):
        sp.async_save({"w": torch.ones(2)}, tmp_path / "c", mode="later")
    with pytest.raises(errors.InvalidOptionError, match="if_busy"):
        sp.async_save({"w": torch.ones(2)}, tmp_path / "c", if_busy="drop")
    assert not (tmp_path / "c").exists()


def test_writer_messages_are_frozen_and_cross_a_pipe_whole() -> None:
    chunk = Chunk(fqn="w", per_rank=False, key="w", dtype="float32", shape=(2,), offsets=(0,), nbytes=8)
    job = messages.Job(
        job_id=1,
        token="abc",
        rank=0,
        world_size=1,
        path="/x",
        buffer_tag="slot0",
        chunks=(chunk,),
        inline=(Inline(fqn="n", per_rank=False, json_text="1"),),
        crc_block=1 << 20,
        timeout_s=5.0,
        overwrite=False,
        commit=AtomicRenameCommit(),
    )
    sent = [
        messages.Alloc(tag="t", size=1),
        messages.Free(tag="t"),
        messages.Submit(job=job),
        messages.Shutdown(),
        messages.Allocated(tag="t", path="/dev/shm/x"),
        messages.AllocFailed(tag="t", error=messages.ErrorReport(name="StagingMemoryError", message="m")),
        messages.Persisted(job_id=1, bytes_written=8),
        messages.Committed(
            job_id=1, outcome=messages.Outcome(bytes_written=8, total_bytes=8, phase_seconds={})
        ),
        messages.Failed(job_id=1, error=messages.ErrorReport(name="DiskFullError", message="full")),
    ]
    for msg in sent:
        assert dataclasses.is_dataclass(msg) and type(msg).__dataclass_params__.frozen
        back = pickle.loads(pickle.dumps(msg))
        assert type(back) is type(msg) and dataclasses.fields(back) == dataclasses.fields(msg)
    assert isinstance(sent[-1].error.rebuild(), errors.DiskFullError)
    assert isinstance(messages.ErrorReport(name="KeyError", message="k").rebuild(), errors.WriterError)
