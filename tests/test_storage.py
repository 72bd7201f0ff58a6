"""Every backend runs the shipped conformance suite (``stashpoint.storage.testing``),
plus checkpoints saved and loaded through it, and what is particular to each backend."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
import torch

import stashpoint
from stashpoint.storage import LocalStorage, MemoryStorage, Storage, resolve
from stashpoint.storage.testing import StorageConformance

import dist_cases


class CheckpointsThroughBackend:
    """Checkpoints saved and loaded through a backend; subclasses provide a ``url`` fixture."""

    def test_checkpoint_round_trip(self, url: str):
        model = torch.nn.Linear(5, 3)
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 5)).sum().backward()
        opt.step()
        stashpoint.save({"model": model, "optim": opt, "note": "hi"}, url)
        model2 = torch.nn.Linear(5, 3)
        opt2 = torch.optim.Adam(model2.parameters())
        state = {"model": model2, "optim": opt2, "note": ""}
        stashpoint.load(state, url)
        assert state["note"] == "hi"
        for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
            assert torch.equal(a, b)
        assert torch.equal(stashpoint.load_full(url, ["model.weight"])["model.weight"], model.weight.detach())

    def test_checkpoint_overwrite_rules(self, url: str):
        stashpoint.save({"a": torch.ones(3), "b": torch.zeros(2)}, url)
        with pytest.raises(stashpoint.errors.CheckpointExistsError):
            stashpoint.save({"a": torch.ones(3)}, url)
        stashpoint.save({"c": torch.full((4,), 7.0)}, url, overwrite=True)
        got = stashpoint.load_full(url)
        assert list(got) == ["c"] and torch.equal(got["c"], torch.full((4,), 7.0))

    def test_checkpoint_commit_visibility(self, url: str):
        """A reader polling during saves sees nothing, an error, or one whole checkpoint."""
        versions = [float(v) for v in range(1, 4)]
        stop = threading.Event()
        seen: list[float] = []
        problems: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    got = stashpoint.load_full(url)
                except stashpoint.errors.StashpointError:
                    continue  # not committed yet, or replaced while we read: reported, fine
                values = {float(t.flatten()[0]) for t in got.values()} | {
                    float(t.flatten()[-1]) for t in got.values()
                }
                if len(values) != 1 or len(got) != 4:
                    problems.append(f"mixed or partial checkpoint: {len(got)} tensors, values {values}")
                seen.extend(values)

        t = threading.Thread(target=reader)
        t.start()
        try:
            for v in versions:
                state = {f"t{i}": torch.full((256, 1024), v) for i in range(4)}
                stashpoint.save(state, url, overwrite=True)
        finally:
            stop.set()
            t.join(60)
        assert not problems, problems[:3]
        final = stashpoint.load_full(url)
        assert all(torch.equal(x, torch.full((256, 1024), versions[-1])) for x in final.values())

    def test_zero_size_tensors_and_unicode_checkpoint_path(self, url: str):
        where = url + "-ünïcødé ✓"
        state = {"empty": torch.zeros(0, 5), "scalar": torch.tensor(3.0), "名前": torch.arange(4)}
        stashpoint.save(state, where)
        got = stashpoint.load_full(where)
        assert got["empty"].shape == (0, 5) and float(got["scalar"]) == 3.0
        assert torch.equal(got["名前"], torch.arange(4))


class TestLocalStorage(StorageConformance, CheckpointsThroughBackend):
    @pytest.fixture
    def storage(self) -> Storage:
        return LocalStorage()

    @pytest.fixture
    def root(self, tmp_path) -> str:
        return str(tmp_path)

    @pytest.fixture
    def url(self, tmp_path) -> str:
        return str(tmp_path / "ckpt")


class TestMemoryStorage(StorageConformance, CheckpointsThroughBackend):
    @pytest.fixture
    def storage(self) -> Storage:
        return MemoryStorage()

    @pytest.fixture
    def root(self) -> str:
        return f"/t-{uuid.uuid4().hex}"

    @pytest.fixture
    def url(self) -> str:
        return f"memory://t-{uuid.uuid4().hex}/ckpt"


class TestLocalDirectStorage(StorageConformance, CheckpointsThroughBackend):
    """The local backend with O_DIRECT writes, on a real disk (pytest's tmp dir, not tmpfs)."""

    @pytest.fixture
    def storage(self) -> Storage:
        return LocalStorage(direct_io=True)

    @pytest.fixture
    def root(self, tmp_path) -> str:
        return str(tmp_path)

    @pytest.fixture
    def url(self, tmp_path, monkeypatch) -> str:
        monkeypatch.setenv("STASHPOINT_DIRECT_IO", "1")
        return str(tmp_path / "ckpt")


def _direct_pieces_case(directory: str) -> tuple[bytes, int]:
    """Fill one file the way the save engine does: threads writing uneven pieces at offsets.

    Returns the expected bytes and how many went through O_DIRECT.
    """
    size = (40 << 20) + 12_345
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    # unaligned cut points, pieces from tiny (buffered) to several MiB (direct middles);
    # the sources are slices of one buffer, so their addresses are mostly unaligned too
    cuts = [0, 1, 4097, 100_000, (3 << 20) + 5, (9 << 20) + 4096, (20 << 20) + 7, (33 << 20), size]
    view = memoryview(data)
    storage = LocalStorage(direct_io=True)
    path = os.path.join(directory, "pieces.bin")
    writer = storage.open_writer(path, size=size)
    threads = [
        threading.Thread(target=writer.write_at, args=(lo, view[lo:hi])) for lo, hi in zip(cuts, cuts[1:])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    direct = writer.direct_bytes
    writer.close()
    assert storage.read_bytes(path) == data
    return data, direct


def test_direct_io_writes_exact_bytes_on_disk(tmp_path):
    _, direct = _direct_pieces_case(str(tmp_path))
    assert direct > 32 << 20  # the big middles really bypassed the page cache


def test_direct_io_aligned_source_is_written_without_a_copy(tmp_path):
    import mmap

    buf = mmap.mmap(-1, 8 << 20)  # page-aligned memory
    buf[:] = os.urandom(8 << 20)
    path = str(tmp_path / "aligned.bin")
    writer = LocalStorage(direct_io=True).open_writer(path, size=len(buf) + 4096)
    writer.write_at(4096, memoryview(buf))
    writer.write_at(0, b"h" * 4096)
    assert writer.direct_bytes == 8 << 20
    writer.close()
    with open(path, "rb") as f:
        assert f.read(4096) == b"h" * 4096 and f.read() == bytes(buf)


def test_direct_io_falls_back_where_refused():
    """tmpfs refuses O_DIRECT before Linux 6.6 (EINVAL) and takes it after: same bytes either way."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        _direct_pieces_case(d)


def test_direct_io_from_the_environment_round_trips_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("STASHPOINT_DIRECT_IO", "1")
    state = {f"t{i}": torch.randn(1000 + i, 777) for i in range(3)}
    stashpoint.save(state, tmp_path / "c")
    got = stashpoint.load_full(tmp_path / "c")
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_file_url_and_unknown_scheme(tmp_path):
    stashpoint.save({"x": torch.ones(2)}, f"file://{tmp_path}/c")
    assert torch.equal(stashpoint.load_full(tmp_path / "c")["x"], torch.ones(2))
    with pytest.raises(stashpoint.errors.UnsupportedStorageError, match="gopher"):
        stashpoint.save({"x": torch.ones(2)}, "gopher://x/y")


# --- fsspec: its in-memory filesystem (object-store-like) and its local one -----------------

fsspec = pytest.importorskip("fsspec")


class TestFsspecMemoryStorage(StorageConformance, CheckpointsThroughBackend):
    """``fsspec+memory://``: fsspec's own memory filesystem, committed with a marker."""

    @pytest.fixture
    def storage(self) -> Storage:
        storage, _ = resolve("fsspec+memory://conformance")
        assert type(storage).__name__ == "FsspecStorage" and not storage.atomic_rename
        return storage

    @pytest.fixture
    def root(self) -> str:
        return f"/t-{uuid.uuid4().hex}"

    @pytest.fixture
    def url(self) -> str:
        return f"fsspec+memory://t-{uuid.uuid4().hex}/ckpt"


class TestFsspecLocalStorage(StorageConformance, CheckpointsThroughBackend):
    """``local://``: fsspec's local filesystem (atomic rename, fsync'd writes)."""

    @pytest.fixture
    def storage(self) -> Storage:
        storage, _ = resolve("local:///")
        assert type(storage).__name__ == "FsspecStorage" and storage.atomic_rename
        return storage

    @pytest.fixture
    def root(self, tmp_path) -> str:
        return str(tmp_path)

    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"local://{tmp_path}/ckpt"


def test_fsspec_urls_resolve_back_to_the_same_place(tmp_path):
    storage, path = resolve("fsspec+memory://a/b")
    assert path == "/a/b" and storage.url(path) == "fsspec+memory://a/b"
    assert resolve(storage.url(path))[1] == path
    storage, path = resolve(f"local://{tmp_path}/c")
    assert path == f"{tmp_path}/c" and resolve(storage.url(path))[1] == path
    with pytest.raises(stashpoint.errors.UnsupportedStorageError, match="nosuchproto"):
        resolve("fsspec+nosuchproto://x/y")


def test_fsspec_memory_checkpoint_is_invisible_until_the_index_lands():
    url = f"fsspec+memory://t-{uuid.uuid4().hex}/ckpt"
    storage, path = resolve(url)
    stashpoint.save({"w": torch.arange(10.0)}, url)
    storage.delete(storage.join(path, "index.json"))  # as if the save died before the commit
    with pytest.raises(stashpoint.errors.IncompleteCheckpointError):
        stashpoint.load_full(url)


def test_fsspec_local_save_at_two_ranks_load_at_three(pools, tmp_path):
    """Spawned ranks resolve ``local://`` themselves, so this crosses processes."""
    case = {
        "save_world": 2,
        "load_world": 3,
        "step": 7,
        "tensors": [
            {
                "shape": [6, 5],
                "dtype": "float32",
                "seed": 1,
                "save": {"mesh": [2], "placements": [("S", 0)]},
                "load": {"mesh": [3], "placements": [("S", 1)]},
            },
            {"shape": [4], "dtype": "bfloat16", "seed": 2, "save": None, "load": None},
        ],
    }
    url = f"local://{tmp_path}/ckpt"
    pools(2).run(dist_cases.save_case, case, url)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        "data-00000.safetensors",
        "data-00001.safetensors",
        "index.json",
    ]
    for rank, r in enumerate(pools(3).run(dist_cases.load_case, case, url)):
        assert r["mismatches"] == [] and r["step"] == 7, rank
