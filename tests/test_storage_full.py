"""Out of space at the storage layer: a real, tiny tmpfs runs out of bytes or of inodes.

Every write path of the backends that write local files (``write``, ``write_at``,
``close``, ``write_bytes``, and the create itself when inodes run out) raises
:class:`DiskFullError`, naming the object, and an aborted writer frees what it took.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from stashpoint.errors import DiskFullError, StorageWriteError
from stashpoint.storage import LocalStorage, Storage, resolve

#: the tmpfs under test: 1 MiB of data, 16 inodes (the root directory takes one)
TMPFS_OPTIONS = "size=1m,nr_inodes=16"
BIG = 2 << 20  # twice what fits


@pytest.fixture
def full_dir(tmp_path) -> str:
    """A fresh tmpfs of 1 MiB and 16 inodes, mounted for this test (skips if not permitted)."""
    where = tmp_path / "tiny"
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", TMPFS_OPTIONS, "none", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


BACKENDS = {
    "local": lambda: LocalStorage(direct_io=False),
    "local-direct": lambda: LocalStorage(direct_io=True),
    "fsspec-local": lambda: resolve("local:///")[0],
}


@pytest.fixture(params=list(BACKENDS))
def storage(request) -> Storage:
    if request.param == "fsspec-local":
        pytest.importorskip("fsspec")
    return BACKENDS[request.param]()


def _assert_disk_full(exc: BaseException, path: str) -> None:
    assert type(exc) is DiskFullError and isinstance(exc, StorageWriteError)
    assert exc.errno == errno.ENOSPC and path in str(exc), str(exc)


def _still_writable(storage: Storage, directory: str) -> None:
    """What a failed write took was given back: a small object fits again."""
    p = os.path.join(directory, "after")
    storage.write_bytes(p, b"y" * 100_000)
    assert storage.read_bytes(p) == b"y" * 100_000


def test_write_bytes_past_the_space(storage: Storage, full_dir: str):
    p = os.path.join(full_dir, "big")
    with pytest.raises(DiskFullError) as info:
        storage.write_bytes(p, b"x" * BIG)
    _assert_disk_full(info.value, p)
    assert not storage.exists(p)
    _still_writable(storage, full_dir)


def test_streamed_writer_past_the_space(storage: Storage, full_dir: str):
    p = os.path.join(full_dir, "streamed")
    writer = storage.open_writer(p)
    with pytest.raises(DiskFullError) as info:  # from a write, or from close (buffered files)
        for _ in range(BIG // (128 << 10)):
            writer.write(b"s" * (128 << 10))
        writer.close()
    _assert_disk_full(info.value, p)
    writer.abort()
    assert not storage.exists(p)
    _still_writable(storage, full_dir)


def test_positional_writer_past_the_space(full_dir: str):
    storage = LocalStorage()
    p = os.path.join(full_dir, "positional")
    writer = storage.open_writer(p, size=BIG)  # a sparse file: the size itself costs nothing
    writer.write_at(0, b"h" * 4096)
    with pytest.raises(DiskFullError) as info:
        writer.write_at(4096, b"p" * (BIG - 4096))
    _assert_disk_full(info.value, p)
    writer.abort()
    assert not storage.exists(p)
    _still_writable(storage, full_dir)


def test_out_of_inodes(storage: Storage, full_dir: str):
    written = []
    with pytest.raises(DiskFullError) as info:
        for i in range(64):
            p = os.path.join(full_dir, f"f{i}")
            storage.write_bytes(p, b"i")
            written.append(p)
    _assert_disk_full(info.value, os.path.join(full_dir, f"f{len(written)}"))
    assert 0 < len(written) < 16
    assert all(storage.read_bytes(p) == b"i" for p in written)  # what was written stays whole
    storage.delete(written[-1])
    storage.write_bytes(written[-1], b"again")
    assert storage.read_bytes(written[-1]) == b"again"
