"""The shipped conformance suite itself: it catches backends whose declarations are false,
it never hangs on a backend that blocks, and the package does not need pytest for it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from stashpoint.storage import LocalStorage, MemoryStorage, ObjectWriter, Storage, testing
from stashpoint.storage.testing import StorageConformance

SUITE = StorageConformance()


def _memory_root() -> str:
    return f"/t-{uuid.uuid4().hex}"


class _ClaimsToSwap(MemoryStorage):
    def exchange(self, a: str, b: str) -> bool:
        return True  # but swaps nothing


class _ClaimsPositional(MemoryStorage):
    positional_writes = True

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return super().open_writer(path, None)  # writers without ``write_at``


class _HidesUploads(MemoryStorage):
    def abort_incomplete_uploads(self, prefix: str) -> int:
        return 1  # without declaring ``multipart_uploads``


class _ClaimsAtomicRename(MemoryStorage):
    def rename(self, src: str, dst: str) -> None:
        pass  # renames nothing


@pytest.mark.parametrize(
    "storage, check",
    [
        (_ClaimsToSwap(), SUITE.test_exchange_swaps_or_changes_nothing),
        (_ClaimsPositional(), SUITE.test_declared_positional_writes),
        (_HidesUploads(), SUITE.test_abort_incomplete_uploads),
        (_ClaimsAtomicRename(), SUITE.test_declared_atomic_rename),
    ],
    ids=["exchange", "positional_writes", "abort_incomplete_uploads", "atomic_rename"],
)
def test_a_false_declaration_fails_the_suite(storage: Storage, check):
    with pytest.raises(AssertionError):
        check(storage, _memory_root())


def test_true_declarations_pass_the_suite():
    storage = MemoryStorage()
    for check in (
        SUITE.test_exchange_swaps_or_changes_nothing,
        SUITE.test_declared_positional_writes,
        SUITE.test_abort_incomplete_uploads,
        SUITE.test_declared_atomic_rename,
    ):
        check(storage, _memory_root())


class _OpensAnything(LocalStorage):
    """A local backend that opens whatever is at the path, as a naive one would."""

    def size(self, path: str) -> int:
        with open(path, "rb") as f:  # blocks on a FIFO until a writer appears
            return len(f.read(1))


def test_a_backend_that_blocks_on_a_fifo_fails_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(testing, "_BLOCK_LIMIT_S", 1.0)
    with pytest.raises(pytest.fail.Exception, match="blocked"):
        SUITE.test_fifo_in_place_of_a_file_is_refused_without_blocking(_OpensAnything(), str(tmp_path))


def test_a_backend_that_reads_a_device_fails_the_suite(tmp_path):
    with pytest.raises(AssertionError, match="size"):
        SUITE.test_device_in_place_of_a_file_is_refused(_OpensAnything(), str(tmp_path))


def test_local_exchange_swaps_on_tmpfs():
    """tmpfs has ``renameat2(RENAME_EXCHANGE)``: the declaration is True there, not just allowed."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    storage = LocalStorage()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        for prefix, body in ((a, b"A"), (b, b"B")):
            storage.make_prefix(prefix)
            storage.write_bytes(os.path.join(prefix, "f"), body)
        assert storage.exchange(a, b) is True
        assert storage.read_bytes(os.path.join(a, "f")) == b"B"
        assert storage.read_bytes(os.path.join(b, "f")) == b"A"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_package_does_not_need_pytest():
    code = (
        "import sys; sys.modules['pytest'] = None\n"  # as if pytest were not installed
        "import stashpoint, stashpoint.storage\n"
        "try:\n"
        "    import stashpoint.storage.testing\n"
        "except ImportError as exc:\n"
        "    assert 'pip install pytest' in str(exc), exc\n"
        "else:\n"
        "    sys.exit('imported without pytest')\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    done = _python(
        "import sys, stashpoint.storage\n"
        "sys.exit(any(m.split('.')[0] in ('pytest', '_pytest') for m in sys.modules))"
    )
    assert done.returncode == 0, "importing stashpoint.storage imported pytest"
