"""async_save: staging semantics, lazy ordering, the background writer, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import async_cases
import stashpoint
from stashpoint.engine.async_save import staging_pool
from stashpoint.engine.staging import ThreadCopyEngine


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64))
    optim = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.randn(8, 256)).sum().backward()
    optim.step()
    return {"model": model, "optim": optim, "extra": torch.arange(1000.0), "loader": {"step": 3}}


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    out["extra"] = state["extra"].clone()
    return out


def _saved(path) -> dict[str, torch.Tensor]:
    full = stashpoint.load_full(path)
    return {k: v for k, v in full.items() if k.startswith("model.") or k == "extra"}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eager_save_keeps_the_values_at_call_time(tmp_path):
    state = _state()
    before = _tensors(state)
    handle = stashpoint.async_save(state, tmp_path / "c", step=3)
    assert handle.staged()
    with torch.no_grad():  # mutate everything right after the call returns
        for p in state["model"].parameters():
            p.add_(1)
        state["extra"].mul_(-1)
    result = handle.wait(60)
    assert result.bytes_written > 0 and handle.done() and handle.exception() is None
    _assert_same(_saved(tmp_path / "c"), before)
    assert stashpoint.read_index(tmp_path / "c").metadata.step == 3


def test_lazy_mode_orders_copies_before_the_optimizer_step(tmp_path):
    state = _state()
    before = _tensors(state)
    engine = ThreadCopyEngine(delay_s=0.02)  # slow copies: the step would overtake them
    handle = stashpoint.async_save(state, tmp_path / "c", mode="lazy", copy_engine=engine)
    assert not handle.staged()  # returned before the data was copied
    state["model"](torch.randn(8, 256)).sum().backward()  # forward/backward overlap the copies
    state["optim"].step()  # the pre-hook waits for the copies first
    handle.wait(60)
    _assert_same(_saved(tmp_path / "c"), before)


def test_lazy_mode_without_the_hook_would_race(tmp_path):
    """The control: mutating outside the optimizer before wait_staged() is not protected."""
    state = _state()
    engine = ThreadCopyEngine(delay_s=0.05)
    handle = stashpoint.async_save(state, tmp_path / "c", mode="lazy", copy_engine=engine)
    with torch.no_grad():
        state["extra"].fill_(-7)  # no optimizer step: nothing orders this after the copy
    handle.wait(60)
    assert torch.equal(stashpoint.load_full(tmp_path / "c", ["extra"])["extra"], torch.full((1000,), -7.0))


def test_back_to_back_saves_reuse_one_staging_buffer(tmp_path):
    state = _state()
    handles, sizes = [], []
    for i in range(5):
        with torch.no_grad():
            state["extra"].fill_(i)
        handles.append(stashpoint.async_save(state, tmp_path / f"c{i}", if_busy="wait"))
        sizes.append((len(staging_pool().slots), staging_pool().staged_bytes))
    for i, h in enumerate(handles):
        h.wait(60)
        assert torch.equal(
            stashpoint.load_full(tmp_path / f"c{i}", ["extra"])["extra"], torch.full((1000,), float(i))
        )
    assert len(set(sizes)) == 1 and sizes[0][0] == 1  # memory never grew


def test_busy_writer_skip_policy(tmp_path):
    state = _state()
    slow = f"faulty://slow-300{tmp_path}"
    first = stashpoint.async_save(state, f"{slow}/a")
    second = stashpoint.async_save(state, f"{slow}/b", if_busy="skip")
    assert second.skipped and second.done() and second.wait() is None
    first.wait(60)
    assert not os.path.exists(tmp_path / "b")
    third = stashpoint.async_save(state, f"{slow}/c", if_busy="skip")  # free again
    assert not third.skipped
    third.wait(60)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_is_a_named_error_and_keeps_the_previous_checkpoint(tmp_path, mode):
    state = _state()
    before = _tensors(state)
    stashpoint.save(state, tmp_path / "c")
    with torch.no_grad():
        state["extra"].fill_(5)
    url = f"faulty://enospc-200000{tmp_path}/c"
    with pytest.raises(stashpoint.errors.StorageWriteError, match="No space left") as info:
        if mode == "sync":
            stashpoint.save(state, url, overwrite=True)
        else:
            stashpoint.async_save(state, url, overwrite=True).wait(60)
    assert "data-00000.safetensors" in str(info.value)
    _assert_same(_saved(tmp_path / "c"), before)
    assert [n for n in os.listdir(tmp_path) if n != "c"] == []  # no debris left


TRAINER = textwrap.dedent(
    """
    import os, signal, sys, torch, stashpoint
    torch.manual_seed(0)
    state = {"w": torch.randn(2048, 1024), "note": "from a trainer that died"}
    # slow storage: persisting takes long after staging completed
    handle = stashpoint.async_save(state, sys.argv[1])
    handle.wait_staged()
    print("staged", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_writer_commits_after_the_trainer_is_killed(tmp_path):
    url = f"faulty://slow-1000{tmp_path}/c"
    log = tmp_path / "trainer.log"
    with open(log, "w") as out:  # not a pipe: the writer inherits the trainer's stdout
        proc = subprocess.Popen([sys.executable, "-c", TRAINER, url], stdout=out, stderr=subprocess.STDOUT)
        assert proc.wait(timeout=120) == -9, log.read_text()
    assert "staged" in log.read_text()
    assert not os.path.exists(tmp_path / "c" / "index.json")  # not yet: the writer is still at it
    deadline = time.monotonic() + 60
    while not os.path.exists(tmp_path / "c" / "index.json") and time.monotonic() < deadline:
        time.sleep(0.05)
    full = stashpoint.load_full(tmp_path / "c")
    torch.manual_seed(0)
    assert torch.equal(full["w"], torch.randn(2048, 1024))
    assert full["note"] == "from a trainer that died"


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_async_fsdp2_save_at_2_loads_at_3(pools, tmp_path, mode):
    path = str(tmp_path / "ckpt")
    snapshot = pools(2).run(async_cases.async_train_save, path, mode)[0]
    full = stashpoint.load_full(path)
    for name, want in snapshot.items():
        assert torch.equal(full[f"model.{name}"], want), name
    assert full["loader"] == {"step": 1}


def test_too_small_staging_memory_is_a_named_error(tmp_path):
    from stashpoint.engine.staging import SharedBuffer

    small = tmp_path / "tiny-shm"
    small.mkdir()
    # a tmpfs cannot be mounted here; a path on a full device stands in: reserve more than exists
    huge = 1 << 62
    with pytest.raises(stashpoint.errors.StagingMemoryError, match="staging memory"):
        SharedBuffer(str(small / "buf"), huge, create=True)
    assert not (small / "buf").exists()


def test_writer_survives_a_failed_allocation(tmp_path, monkeypatch):
    from stashpoint.engine.async_save import BackgroundWriter

    writer = BackgroundWriter.get()
    with pytest.raises(stashpoint.errors.StagingMemoryError):
        writer.allocate("too-big", 1 << 62, timeout_s=30)
    assert writer.alive
    handle = stashpoint.async_save(_state(), tmp_path / "after")  # still serves saves
    handle.wait(60)
    assert stashpoint.read_index(tmp_path / "after").metadata.world_size == 1


def test_a_dead_writer_is_replaced(tmp_path):
    from stashpoint.engine.async_save import BackgroundWriter

    stashpoint.async_save(_state(), tmp_path / "a").wait(60)
    old = BackgroundWriter.get()
    old.proc.kill()
    old.proc.wait()
    handle = stashpoint.async_save(_state(), tmp_path / "b")  # a new writer, new staging
    handle.wait(60)
    assert BackgroundWriter.get() is not old
    assert stashpoint.load_full(tmp_path / "b", ["loader"])["loader"] == {"step": 3}
