"""Files named by a checkpoint stay inside it.

Every name a checkpoint gives for one of its files (our own index's data files, a DCP
``relative_path``, an HF ``weight_map`` entry) is checked before anything is opened:
no absolute paths, no ``..``, and, unless the caller opts in, no symbolic link that
resolves to somewhere outside the checkpoint.
"""

from __future__ import annotations

import os
import re

from stashpoint.errors import UnsafePathError
from stashpoint.storage import Storage

_DRIVE = re.compile(r"^[A-Za-z]:")


def is_relative_inside(name: str) -> bool:
    """A relative path that cannot climb out of the directory it is joined to."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or _DRIVE.match(name):
        return False
    return all(part not in ("", "..") for part in re.split(r"[/\\]", name.rstrip("/")))


def member(storage: Storage, root: str, name: object, *, what: str, follow_symlinks: bool = False) -> str:
    """The storage path of the file ``name`` of the checkpoint at ``root``.

    Raises :class:`~stashpoint.errors.UnsafePathError` when the name points outside the
    checkpoint, or is a link to outside it and ``follow_symlinks`` is False.
    """
    where = storage.describe(root)
    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
    if not isinstance(text, str) or not is_relative_inside(text):
        raise UnsafePathError(f"{where}: {what} names {name!r}, which is not a file inside the checkpoint")
    full = storage.join(root, text)
    if not follow_symlinks and storage.escapes(root, full):
        raise UnsafePathError(
            f"{where}: {what} {text!r} is a symbolic link to outside the checkpoint; pass "
            "follow_symlinks=True to read it anyway"
        )
    return full
