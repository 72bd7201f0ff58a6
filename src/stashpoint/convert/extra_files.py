"""Files copied beside an export (``config.json``, tokenizer files): found first, then copied.

Every listed file is looked up before the export writes anything, so a missing one
raises :class:`~stashpoint.errors.DataFileMissingError` naming it and leaves no
half-written output behind.  A relative name is taken relative to the source
checkpoint, or to ``copy_from`` when the caller gives a directory; an absolute path is
used as it is.  Sources may be on any storage stashpoint reads (local, S3, fsspec).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from stashpoint.errors import DataFileMissingError, InvalidOptionError
from stashpoint.storage import LocalStorage, Storage, resolve

#: names an HF export writes itself; a copied file must not replace them
_WEIGHT_NAMES = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


@dataclass(frozen=True)
class ExtraFile:
    """One file to copy: where it is read from and the name it gets in the output."""

    storage: Storage
    path: str
    name: str


def resolve_extra_files(
    src: str | os.PathLike,
    names: Iterable[str | os.PathLike],
    copy_from: str | os.PathLike | None = None,
) -> tuple[ExtraFile, ...]:
    """Find every file of ``names`` (see the module docstring), or raise before anything is written.

    Raises :class:`DataFileMissingError` naming the first missing file,
    :class:`~stashpoint.errors.NotAFileError` for a directory or special file, and
    :class:`InvalidOptionError` when two files share a name or one would replace the
    exported weights.
    """
    storage, base = resolve(copy_from if copy_from is not None else src)
    found: list[ExtraFile] = []
    for raw in names:
        text = os.fspath(raw)
        if os.path.isabs(text):
            where, path, store = os.path.dirname(text), text, LocalStorage()
        else:
            where, path, store = storage.describe(base), storage.join(base, text), storage
        name = os.path.basename(text)
        if not store.exists(path):
            origin = "copy_from" if copy_from is not None else "the source checkpoint"
            raise DataFileMissingError(f"{where}: {text!r} to copy does not exist (looked in {origin})")
        store.size(path)  # NotAFileError for a directory, FIFO or device
        if _WEIGHT_NAMES.fullmatch(name):
            raise InvalidOptionError(f"{where}: copying {text!r} would replace the exported weights")
        if any(f.name == name for f in found):
            raise InvalidOptionError(f"{where}: two files to copy are both named {name!r}")
        found.append(ExtraFile(storage=store, path=path, name=name))
    return tuple(found)


def copy_extra_files(files: Iterable[ExtraFile], dst: str) -> None:
    """Copy each file into the local directory ``dst``; a partial copy never has the final name."""
    for extra in files:
        target = os.path.join(dst, extra.name)
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(extra.storage.read_bytes(extra.path))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
