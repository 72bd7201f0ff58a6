"""How the command line reports an error: one plain line, in flags, with an exit code.

Library messages speak Python (``pass overwrite=True``) and may carry text from other
programs (an evaluation command's stderr, with colour codes and tracebacks).  The
command line says the same in its own terms: options become the flags of the command
that ran, colour codes and pasted tracebacks go (a traceback keeps its last line, the
exception), and everything fits on one line.  Exit code 2 means the command was asked
wrongly (usage), 1 that it failed.  Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from stashpoint.errors import InvalidOptionError, MergeConfigError, StashpointError

USAGE = 2
FAILURE = 1

#: errors that say the command was asked wrongly (an option's value, a merge configuration)
USAGE_ERRORS = (InvalidOptionError, MergeConfigError)
#: optional dependencies (module name) and the extra that installs each
EXTRAS = {
    "matplotlib": "report",
    "yaml": "merge",
    "boto3": "s3",
    "botocore": "s3",
    "fsspec": "fsspec",
    "transformers": "hf",
}

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRACEBACK = "Traceback (most recent call last):"
_KEYWORD_TRUE = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)*)=True\b")
_IDENTIFIER = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
#: library spellings of an option that the command line spells by another option's flag
_SYNONYMS = {"max_shard_bytes": "max_shard_size"}


@dataclass(frozen=True)
class Failure:
    """What to print (after ``stashpoint COMMAND: ``) and the exit code."""

    message: str
    code: int


def one_line(text: str) -> str:
    """``text`` without colour codes or pasted tracebacks, its lines joined with ``; ``."""
    kept: list[str] = []
    in_traceback = False
    for raw in _ANSI.sub("", text).splitlines():
        line = _CONTROL.sub("", raw)
        if _TRACEBACK in line:
            before = line.split(_TRACEBACK)[0].strip()
            if before:
                kept.append(before)
            in_traceback = True
            continue
        if in_traceback and (not line.strip() or line[:1].isspace()):
            continue  # a frame of the traceback
        in_traceback = False
        if line.strip():
            kept.append(line.strip())
    return "; ".join(kept)


def in_flags(message: str, flags: Mapping[str, str]) -> str:
    """Python option names in ``message`` as the command's flags (``flags``: dest -> flag).

    ``allow_pickle=True`` becomes ``--allow-pickle``; a bare ``max_shard_size`` becomes
    ``--max-shard-size``.  Names the command has no flag for are left as they are.
    """

    def flag(name: str) -> str | None:
        return flags.get(_SYNONYMS.get(name, name))

    message = _KEYWORD_TRUE.sub(lambda m: flag(m.group(1)) or m.group(0), message)
    return _IDENTIFIER.sub(lambda m: flag(m.group(0)) or m.group(0), message)


def explain(exc: BaseException, flags: Mapping[str, str]) -> Failure | None:
    """How to report ``exc``; None for an exception that is a bug (let it show its traceback)."""
    if isinstance(exc, StashpointError):
        code = USAGE if isinstance(exc, USAGE_ERRORS) else FAILURE
        return Failure(f"{type(exc).__name__}: {in_flags(one_line(str(exc)), flags)}", code)
    if isinstance(exc, ModuleNotFoundError) and exc.name is not None:
        top = exc.name.split(".")[0]
        if top in EXTRAS:
            return Failure(
                f"this needs {top}, which is not installed; install it with: "
                f"pip install 'stashpoint[{EXTRAS[top]}]'",
                FAILURE,
            )
        return None
    if isinstance(exc, OSError) and exc.filename is not None:
        return Failure(f"{exc.filename}: {exc.strerror or one_line(str(exc))}", FAILURE)
    return None
