"""The storage conformance suite: one set of tests that every backend passes.

stashpoint's own backends (local, O_DIRECT, memory, fsspec, S3) run it in their test
files, and a plugin author runs it on a new backend by subclassing
:class:`StorageConformance` in a pytest test file and providing two fixtures::

    import uuid

    import pytest

    from stashpoint.storage.testing import StorageConformance
    from my_plugin import MyStorage


    class TestMyStorage(StorageConformance):
        @pytest.fixture
        def storage(self):
            # the backend under test
            return MyStorage(bucket="scratch")

        @pytest.fixture
        def root(self):
            # an empty prefix of that backend, a new one for every test
            return f"conformance/{uuid.uuid4().hex}"

Every ``test_*`` method then runs against the backend.  The suite covers the byte
interface of :class:`~stashpoint.storage.base.Storage` (writes, ranged reads, listing,
deletion, overwrite and abort rules, concurrent writers, large and unicode objects)
and checks that what the backend declares among its optional capabilities (see the
:class:`~stashpoint.storage.base.Storage` docstring) matches what it does.  Where
``root`` is a directory of this machine's filesystem, it also checks that a FIFO,
socket, device or directory in place of a file is refused with
:class:`~stashpoint.errors.NotAFileError`, never blocked on or read.

This module needs pytest; ``import stashpoint`` and ``stashpoint.storage`` do not
import it.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable

from stashpoint.errors import NotAFileError
from stashpoint.storage.base import Storage

try:
    import pytest
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"stashpoint.storage.testing needs pytest ({exc}): pip install pytest") from exc

#: seconds a call on a special file may take before the suite calls it blocked
_BLOCK_LIMIT_S = 10.0


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _is_local_dir(root: str) -> bool:
    """True when ``root`` names a directory of this machine (the backend reads local paths)."""
    return os.path.isabs(root) and os.path.isdir(root)


def _refused_within_limit(call: Callable[[], object], fifo: str | None = None) -> BaseException | None:
    """Run ``call`` in a thread; return what it raised (None if it returned).

    Fails the test if it has not finished within ``_BLOCK_LIMIT_S``; a call blocked
    opening ``fifo`` is released first by opening the FIFO's other end.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(_BLOCK_LIMIT_S)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # both ends: frees the opener
            t.join(_BLOCK_LIMIT_S)
        pytest.fail(f"blocked for over {_BLOCK_LIMIT_S:g}s on a special file")
    return outcome[0]


class StorageConformance:
    """Subclasses provide ``storage`` and ``root`` fixtures; every test runs on each backend.

    ``storage`` is the backend under test; ``root`` an empty prefix in it, fresh for
    each test (see the module docstring for an example).
    """

    # --- bytes in, bytes out ---------------------------------------------------------------

    def test_write_read_and_ranges(self, storage: Storage, root: str):
        p = storage.join(root, "a.bin")
        storage.write_bytes(p, bytes(range(256)))
        assert storage.size(p) == 256
        assert storage.read_bytes(p) == bytes(range(256))
        assert storage.read_range(p, 10, 20) == bytes(range(10, 20))
        assert storage.read_range(p, 250, 300) == bytes(range(250, 256))  # short read at the end
        buf = bytearray(4)
        assert storage.read_into(p, 100, memoryview(buf)) == 4 and bytes(buf) == bytes(range(100, 104))

    def test_streamed_writer_and_abort(self, storage: Storage, root: str):
        p = storage.join(root, "s.bin")
        with storage.open_writer(p) as w:
            for i in range(10):
                w.write(bytes([i]) * 1000)
        assert storage.size(p) == 10_000 and storage.read_range(p, 9000, 9001) == b"\x09"
        q = storage.join(root, "aborted.bin")
        w = storage.open_writer(q)
        w.write(b"xyz")
        w.abort()
        assert not storage.exists(q)

    def test_empty_object_and_overwrite(self, storage: Storage, root: str):
        p = storage.join(root, "e")
        storage.write_bytes(p, b"")
        assert storage.exists(p) and storage.size(p) == 0 and storage.read_bytes(p) == b""
        storage.write_bytes(p, b"new")
        assert storage.read_bytes(p) == b"new"

    def test_missing_objects(self, storage: Storage, root: str):
        p = storage.join(root, "nope")
        assert not storage.exists(p)
        with pytest.raises(FileNotFoundError):
            storage.size(p)
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(p)
        storage.delete(p)  # no error

    def test_listing_and_delete_prefix(self, storage: Storage, root: str):
        d = storage.join(root, "dir")
        storage.make_prefix(d)
        storage.make_prefix(storage.join(d, "sub"))
        for name in ("b", "a", "ünïcødé ✓"):
            storage.write_bytes(storage.join(d, name), name.encode())
        storage.write_bytes(storage.join(d, "sub", "x"), b"x")
        assert storage.list(d) == sorted(["a", "b", "sub", "ünïcødé ✓"])
        assert storage.read_bytes(storage.join(d, "ünïcødé ✓")) == "ünïcødé ✓".encode()
        assert storage.is_prefix(d) and not storage.is_prefix(storage.join(d, "a"))
        storage.delete(d)
        assert not storage.exists(storage.join(d, "a")) and storage.list(d) == []

    def test_listing_an_object_or_nothing_is_empty(self, storage: Storage, root: str):
        p = storage.join(root, "plain")
        storage.write_bytes(p, b"x")
        assert storage.list(p) == [] and storage.list(storage.join(root, "missing")) == []

    def test_a_prefix_is_not_an_object(self, storage: Storage, root: str):
        """``size`` and reads of a prefix fail with a named error, whatever the backend."""
        d = storage.join(root, "d")
        storage.make_prefix(d)
        storage.write_bytes(storage.join(d, "f"), b"f")
        expected = NotAFileError if _is_local_dir(root) else (FileNotFoundError, NotAFileError)
        with pytest.raises(expected):
            storage.size(d)
        with pytest.raises(expected):
            storage.read_into(d, 0, memoryview(bytearray(4)))

    def test_concurrent_writers_to_distinct_objects(self, storage: Storage, root: str):
        def write(i: int) -> None:
            storage.write_bytes(storage.join(root, f"c{i}"), bytes([i]) * 100_000)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(8):
            assert storage.read_bytes(storage.join(root, f"c{i}")) == bytes([i]) * 100_000

    def test_large_object(self, storage: Storage, root: str):
        p = storage.join(root, "big")
        data = _random_bytes(24 << 20, seed=1)
        with storage.open_writer(p) as w:
            w.write(memoryview(data))
        assert storage.size(p) == len(data)
        lo = (16 << 20) + 3
        assert storage.read_range(p, lo, lo + 1000) == data[lo : lo + 1000]

    def test_overwrite_replaces_the_whole_object(self, storage: Storage, root: str):
        p = storage.join(root, "o")
        storage.write_bytes(p, b"a" * 100_000)
        with storage.open_writer(p) as w:  # shorter, streamed: nothing of the old may remain
            w.write(b"b" * 10)
            w.write(b"c" * 5)
        assert storage.size(p) == 15 and storage.read_bytes(p) == b"b" * 10 + b"c" * 5

    def test_aborted_write_never_leaves_a_partial_object(self, storage: Storage, root: str):
        p = storage.join(root, "keep")
        storage.write_bytes(p, b"old")
        w = storage.open_writer(p)
        w.write(b"new-but-abandoned" * 1000)
        w.abort()
        # either the old object survives (object stores) or none exists (filesystems)
        assert not storage.exists(p) or storage.read_bytes(p) == b"old"

    def test_empty_streamed_object(self, storage: Storage, root: str):
        p = storage.join(root, "empty")
        with storage.open_writer(p):
            pass
        assert storage.exists(p) and storage.size(p) == 0 and storage.read_bytes(p) == b""
        assert storage.read_into(p, 0, memoryview(bytearray(8))) == 0

    def test_unicode_keys(self, storage: Storage, root: str):
        d = storage.join(root, "ünï cødé ✓")
        storage.make_prefix(d)
        for name in ("日本語.bin", "emoji 🎉", "a+b=c&d"):
            storage.write_bytes(storage.join(d, name), name.encode())
        assert storage.list(d) == sorted(["日本語.bin", "emoji 🎉", "a+b=c&d"])
        assert storage.list(root) == ["ünï cødé ✓"]
        for name in storage.list(d):
            assert storage.read_bytes(storage.join(d, name)) == name.encode()

    def test_large_object_in_uneven_pieces(self, storage: Storage, root: str):
        p = storage.join(root, "pieces")
        data = _random_bytes(23 << 20, seed=2)
        view = memoryview(data)
        with storage.open_writer(p, size=len(data)) as w:
            step = (3 << 20) + 17  # pieces that straddle any part boundary
            for lo in range(0, len(data), step):
                w.write(view[lo : lo + step])
        assert storage.size(p) == len(data)
        out = bytearray(len(data) + 1000)  # one long read, asking for more than there is
        assert storage.read_into(p, 0, memoryview(out)) == len(data)
        assert out[: len(data)] == data

    def test_concurrent_streamed_writers(self, storage: Storage, root: str):
        """Several writers open at once, their pieces interleaved in time."""
        n, piece = 4, 1 << 20
        writers = [storage.open_writer(storage.join(root, f"w{i}")) for i in range(n)]
        errors: list[BaseException] = []

        def fill(i: int) -> None:
            try:
                for j in range(7):
                    writers[i].write(bytes([i * 16 + j]) * piece)
                writers[i].close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=fill, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        for i in range(n):
            got = storage.read_bytes(storage.join(root, f"w{i}"))
            assert got == b"".join(bytes([i * 16 + j]) * piece for j in range(7))

    # --- declared capabilities match behaviour ----------------------------------------------

    def test_declared_atomic_rename(self, storage: Storage, root: str):
        if not storage.atomic_rename:
            pytest.skip("backend commits with a marker")
        src, dst = storage.join(root, "src"), storage.join(root, "dst")
        storage.make_prefix(src)
        storage.write_bytes(storage.join(src, "f"), b"1")
        storage.rename(src, dst)
        assert storage.exists(storage.join(dst, "f")), "rename left nothing at the destination"
        assert storage.read_bytes(storage.join(dst, "f")) == b"1"
        assert not storage.exists(storage.join(src, "f"))

    def test_declared_positional_writes(self, storage: Storage, root: str):
        p = storage.join(root, "positional")
        data = _random_bytes((5 << 20) + 333, seed=3)
        writer = storage.open_writer(p, size=len(data))
        assert writer.positional == storage.positional_writes
        if not storage.positional_writes:
            writer.abort()
            return
        cuts = [0, 7, 4096, 1 << 20, (3 << 20) + 1, len(data)]
        pieces = list(zip(cuts, cuts[1:]))[::-1]  # last piece first: offsets, not order, decide
        threads = [
            threading.Thread(target=writer.write_at, args=(lo, memoryview(data)[lo:hi])) for lo, hi in pieces
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        writer.close()
        assert storage.read_bytes(p) == data

    def test_exchange_swaps_or_changes_nothing(self, storage: Storage, root: str):
        a, b = storage.join(root, "a"), storage.join(root, "b")
        for prefix, body in ((a, b"A"), (b, b"B")):
            storage.make_prefix(prefix)
            storage.write_bytes(storage.join(prefix, "f"), body)
        swapped = storage.exchange(a, b)
        assert isinstance(swapped, bool)
        first, second = (b"B", b"A") if swapped else (b"A", b"B")
        assert storage.read_bytes(storage.join(a, "f")) == first
        assert storage.read_bytes(storage.join(b, "f")) == second
        assert storage.exchange(a, storage.join(root, "missing")) is False
        assert storage.read_bytes(storage.join(a, "f")) == first

    def test_abort_incomplete_uploads(self, storage: Storage, root: str):
        prefix = storage.join(root, "uploads") + "/"
        kept = storage.join(root, "uploads", "kept")
        storage.make_prefix(storage.join(root, "uploads"))
        storage.write_bytes(kept, b"kept")
        assert storage.abort_incomplete_uploads(prefix) == 0  # nothing pending there
        w = storage.open_writer(storage.join(root, "uploads", "open"))
        w.write(b"pending" * 1000)
        aborted = storage.abort_incomplete_uploads(prefix)
        assert isinstance(aborted, int) and aborted >= 0
        if not storage.multipart_uploads:
            assert aborted == 0
        w.abort()
        assert storage.read_bytes(kept) == b"kept"
        assert not storage.exists(storage.join(root, "uploads", "open"))

    # --- special files in place of a file (backends of local paths) ---------------------------

    def _local_root(self, root: str) -> str:
        if not _is_local_dir(root):
            pytest.skip("the backend does not read this machine's paths")
        return root

    def _assert_refused(self, storage: Storage, path: str, fifo: str | None = None) -> None:
        calls = {
            "size": lambda: storage.size(path),
            "read_bytes": lambda: storage.read_bytes(path),
            "read_into": lambda: storage.read_into(path, 0, memoryview(bytearray(16))),
            "open_writer": lambda: storage.open_writer(path).abort(),
            "write_bytes": lambda: storage.write_bytes(path, b"x"),
        }
        for name, call in calls.items():
            raised = _refused_within_limit(call, fifo)
            assert isinstance(raised, NotAFileError), f"{name}({path!r}): {raised!r}"
            assert os.path.basename(path) in str(raised), f"{raised} does not name {path!r}"

    def test_fifo_in_place_of_a_file_is_refused_without_blocking(self, storage: Storage, root: str):
        path = os.path.join(self._local_root(root), "data.fifo")
        os.mkfifo(path)
        self._assert_refused(storage, path, fifo=path)
        assert storage.exists(path)  # refused, not removed

    def test_socket_in_place_of_a_file_is_refused(self, storage: Storage, root: str):
        path = os.path.join(self._local_root(root), "s")
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.bind(path)
            except OSError as exc:  # e.g. a path longer than sun_path allows
                pytest.skip(f"cannot bind a unix socket here: {exc}")
            self._assert_refused(storage, path)

    def test_device_in_place_of_a_file_is_refused(self, storage: Storage, root: str):
        path = os.path.join(self._local_root(root), "zeros")
        os.symlink("/dev/zero", path)  # read as a file, it would never end
        self._assert_refused(storage, path)

    def test_directory_in_place_of_a_file_is_refused(self, storage: Storage, root: str):
        path = os.path.join(self._local_root(root), "dir")
        os.mkdir(path)
        self._assert_refused(storage, path)
        assert os.path.isdir(path)


__all__ = ["StorageConformance"]
