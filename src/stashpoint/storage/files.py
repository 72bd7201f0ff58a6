"""Local paths that must be regular files: never block on, or read from, anything else.

A FIFO, socket or device where a checkpoint file is expected (put there by mistake or
on purpose) must not hang a load or a save: opening a FIFO waits for its other end,
and reading a device never ends.  These helpers refuse such paths with
:class:`~stashpoint.errors.NotAFileError`, as they refuse a directory.  Used by every
backend that reads local paths (``LocalStorage``, fsspec's local filesystem).
"""

from __future__ import annotations

import errno
import os
import stat

from stashpoint.errors import NotAFileError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _refusal(path: str, kind: str) -> NotAFileError:
    """Named like the engine names data files: the directory, then the quoted name."""
    return NotAFileError(f"{os.path.dirname(path)}: {os.path.basename(path)!r} is {kind}, not a file")


def _not_a_file(path: str, mode: int) -> NotAFileError | None:
    """The error to raise when ``mode`` is not a regular file's, else None."""
    if stat.S_ISREG(mode):
        return None
    return _refusal(path, next((name for test, name in _KINDS if test(mode)), "not a regular file"))


def regular_size(path: str) -> int:
    """Size of the regular file ``path``; :class:`NotAFileError` for anything else."""
    st = os.stat(path)  # FileNotFoundError when missing
    error = _not_a_file(path, st.st_mode)
    if error is not None:
        raise error
    return st.st_size


def check_regular(path: str) -> None:
    """:class:`NotAFileError` if ``path`` exists and is not a regular file."""
    try:
        regular_size(path)
    except FileNotFoundError:
        pass


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` only if it is (or, with ``O_CREAT``, becomes) a regular file.

    A FIFO, socket or device in place of a file is refused with :class:`NotAFileError`
    before it is opened, and the open itself is non-blocking, so that one swapped in
    after the check cannot block either (opening a FIFO waits for its other end);
    ``fstat`` of the opened descriptor then decides.  ``O_NONBLOCK`` changes nothing
    for regular files.
    """
    check_regular(path)  # a missing path: the open below reports it, or creates the file
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except IsADirectoryError:
        raise _refusal(path, "a directory") from None
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: a socket, or a FIFO nobody reads
            raise
        raise _refusal(path, "a FIFO, socket or device") from None
    try:
        error = _not_a_file(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if error is not None:
        os.close(fd)
        raise error
    return fd


def pread_into(fd: int, offset: int, out: memoryview) -> int:
    """Fill ``out`` from ``offset`` of an open file; fewer bytes only at its end."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def read_regular_into(path: str, offset: int, out: memoryview) -> int:
    """``Storage.read_into`` for a local path: positional reads of a regular file only."""
    fd = open_regular(path)
    try:
        return pread_into(fd, offset, out)
    finally:
        os.close(fd)
