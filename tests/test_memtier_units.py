"""The memory tier's pure parts: manifests, completeness, views, policy — no processes."""

from __future__ import annotations

import os
import signal

import pytest

from stashpoint._dist import Coordinator
from stashpoint.engine import keepers, memtier
from stashpoint.engine.persist import data_file_name
from stashpoint.engine.publish import save_metadata
from stashpoint.engine.records import Inline, Written
from stashpoint.errors import ChecksumMismatchError, IndexCorruptError, InvalidOptionError
from stashpoint.format.index import FORMAT_VERSION, INDEX_FILE, ChunkRecord, Index, Layout
from stashpoint.manager.memory import MemoryPolicy, Preemption
from stashpoint.planning.index_layout import GRID_MIN_CHUNKS
from stashpoint.planning.save_plan import GLOBAL, ItemPlan


def _manifest(rank: int, world: int, step: int, save_id: str = "abc", slot: int = 0) -> memtier.Manifest:
    rec = ChunkRecord(
        offsets=(rank * 2,), shape=(2,), file=data_file_name(rank), key="w", byte_range=(8, 16), crc32c=(1,)
    )
    plan = {
        "w": ItemPlan(
            fqn="w",
            is_tensor=True,
            scope=GLOBAL,
            dtype="float32",
            shape=(2 * world,),
            layout=Layout(mesh_shape=(world,), mesh_dim_names=("dp",), placements=("S(0)",)),
            encoding="",
        ),
        "step": ItemPlan(
            fqn="step", is_tensor=False, scope=GLOBAL, dtype="", shape=(), layout=None, encoding="json"
        ),
    }
    return memtier.Manifest(
        rank=rank,
        slot=slot,
        step=step,
        save_id=save_id,
        world_size=world,
        crc_block=1 << 20,
        file_size=16,
        records=(Written(fqn="w", per_rank=False, dtype="float32", record=rec),)
        + ((Inline(fqn="step", per_rank=False, json_text=str(step)),) if rank == 0 else ()),
        plan=plan if rank == 0 else None,
        metadata=save_metadata(world, step, {}, save_id) if rank == 0 else None,
    )


def _place(root: str, m: memtier.Manifest) -> None:
    os.makedirs(memtier.rank_dir(root, m.rank), exist_ok=True)
    with open(memtier.slot_data(root, m.rank, m.slot), "wb") as f:
        f.write(b"\0" * m.file_size)
    memtier.write_manifest(root, m)


def test_manifest_round_trips_and_any_change_is_refused(tmp_path):
    m = _manifest(0, 2, 7)
    text = memtier.manifest_to_json(m).encode()
    assert memtier.manifest_from_json(text, "m") == m
    with pytest.raises(IndexCorruptError, match="checksum"):
        memtier.manifest_from_json(text.replace(b'"step": 7', b'"step": 8'), "m")
    with pytest.raises(IndexCorruptError, match="no checksum"):
        memtier.manifest_from_json(b"{}", "m")


def test_a_snapshot_is_complete_only_with_every_rank_of_the_same_save(tmp_path):
    root = str(tmp_path / "mem")
    _place(root, _manifest(0, 2, 5, "s5"))
    assert memtier.complete_snapshots(root) == []  # rank 1 is missing
    _place(root, _manifest(1, 2, 5, "other"))
    assert memtier.complete_snapshots(root) == []  # another save of the same step
    _place(root, _manifest(1, 2, 5, "s5", slot=1))
    _place(root, _manifest(0, 2, 6, "s6", slot=1))
    snaps = memtier.complete_snapshots(root)
    assert [(s.step, s.save_id) for s in snaps] == [(5, "s5")]
    memtier.drop_manifest(root, 1, 1)  # the slot is being rewritten
    assert memtier.complete_snapshots(root) == []


def test_a_fifo_in_place_of_a_manifest_is_skipped_without_blocking(tmp_path):
    root = str(tmp_path / "mem")
    _place(root, _manifest(0, 1, 3))
    path = memtier.slot_manifest(root, 0, 0)
    os.unlink(path)
    os.mkfifo(path)
    assert memtier.read_manifests(root, 0) == []


def test_a_damaged_manifest_is_skipped_not_trusted(tmp_path):
    root = str(tmp_path / "mem")
    _place(root, _manifest(0, 1, 3))
    path = memtier.slot_manifest(root, 0, 0)
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"#")
    assert memtier.read_manifests(root, 0) == []


def test_view_is_a_checkpoint_of_hard_links_and_refuses_a_short_slot(tmp_path):
    root = str(tmp_path / "mem")
    for r in range(2):
        _place(root, _manifest(r, 2, 4))
    (snap,) = memtier.complete_snapshots(root)
    view = memtier.open_view(root, snap, "t")
    assert sorted(os.listdir(view)) == ["data-00000.safetensors", "data-00001.safetensors", "index.json"]
    assert (
        os.stat(os.path.join(view, "data-00001.safetensors")).st_ino
        == os.stat(memtier.slot_data(root, 1, 0)).st_ino
    )
    memtier.close_view(view)
    assert not os.path.exists(view)
    os.truncate(memtier.slot_data(root, 1, 0), 4)
    with pytest.raises(ChecksumMismatchError, match="shorter"):
        memtier.open_view(root, snap, "t")


def test_view_index_is_a_current_format_index_listing_every_chunk(tmp_path):
    """A snapshot's view has no index fragments, so its index lists every chunk, even of a
    tensor with as many chunks as a save would describe by a grid."""
    root, world = str(tmp_path / "mem"), GRID_MIN_CHUNKS + 4
    for r in range(world):
        _place(root, _manifest(r, world, 9))
    (snap,) = memtier.complete_snapshots(root)
    view = memtier.open_view(root, snap, "t")
    with open(os.path.join(view, INDEX_FILE), "rb") as f:
        index = Index.from_json(f.read(), view)
    assert index.format_version == FORMAT_VERSION and index.checksum_verified
    assert not index.compact and index.fragments == ()
    assert [c.offsets for c in index.items["w"].chunks] == [(2 * r,) for r in range(world)]
    memtier.close_view(view)


def test_long_socket_paths_are_reached_through_a_directory_descriptor(tmp_path):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    with memtier.socket_address(str(deep / "keeper.sock")) as addr:
        assert len(addr) < 108 and addr.startswith("/proc/self/fd/")
    with memtier.socket_address("/tmp/x.sock") as addr:
        assert addr == "/tmp/x.sock"


def test_memory_tiers_without_a_live_keeper_are_reclaimed(tmp_path):
    root = str(tmp_path / memtier.ROOT_PREFIX) + "dead"
    _place(root, _manifest(0, 1, 1))
    alive = str(tmp_path / memtier.ROOT_PREFIX) + "alive"
    _place(alive, _manifest(0, 1, 1))
    fd = keepers.take_lock(alive, 0)
    try:
        assert keepers.reclaim_memory_roots(str(tmp_path)) == []  # could be a keeper starting
        assert keepers.reclaim_memory_roots(str(tmp_path), grace_s=0) == [root]
        assert os.path.exists(alive) and not os.path.exists(root)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"slots": 1}, "slots must be 2 or more"),
        ({"every_steps": 0}, "every_steps"),
        ({"signal": "SIGKILL"}, "signal"),
        ({"if_busy": "later"}, "if_busy"),
        ({"grace_s": -1}, "grace_s"),
    ],
)
def test_memory_policy_refuses_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        MemoryPolicy(**kwargs)


def test_preemption_signal_only_sets_a_flag_and_notifies_once():
    calls = []
    p = Preemption("SIGUSR2", notify=lambda: calls.append(1))
    try:
        coord = Coordinator(None, 5)
        assert not p.agreed(coord)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert p.agreed(coord)
    finally:
        p.restore()
    assert len(calls) == 1
