"""The bytes of ``index.json``: strict JSON parsing and the index checksum.

Since format version 2 the index ends with a fixed-form member that holds the
SHA-256 of every byte before it (docs/FORMAT.md §3.1)::

    ...,
     "index_sha256": "<64 lowercase hex digits>"
    }

Hashing the bytes as written needs no canonical form of JSON (whose number
formatting differs between languages), and any change to the file, even one a
JSON parser would not notice, is caught before anything in it is believed.
"""

from __future__ import annotations

import hashlib
import json
import re

from stashpoint.errors import IndexCorruptError

CHECKSUM_MEMBER = "index_sha256"
_TRAILER = re.compile(rb'"index_sha256": "([0-9a-f]{64})"\n}\n\Z')
TRAILER_BYTES = len(b'"index_sha256": "') + 64 + len(b'"\n}\n')


def seal(body: str) -> str:
    """Append the checksum member to ``body``, a JSON object as ``json.dumps(..., indent=1)`` writes it."""
    if not body.endswith("\n}"):
        raise ValueError("the index body must be an indented, non-empty JSON object")
    prefix = body[:-2] + ",\n "
    digest = hashlib.sha256(prefix.encode()).hexdigest()
    return f'{prefix}"{CHECKSUM_MEMBER}": "{digest}"\n}}\n'


def check_seal(raw: bytes, where: str) -> bool:
    """True when ``raw`` ends with a checksum member and the checksum matches.

    False when there is no checksum member in its fixed form at the end (a format
    version 1 index, or one damaged there: parsing tells the two apart).  Raises
    IndexCorruptError when the checksum is there and does not match.
    """
    found = _TRAILER.search(raw[-TRAILER_BYTES:])
    if found is None:
        return False
    if hashlib.sha256(raw[:-TRAILER_BYTES]).hexdigest() != found.group(1).decode():
        raise IndexCorruptError(
            f"{where}: index checksum mismatch: {CHECKSUM_MEMBER} does not match the bytes of the "
            "index (it was modified or damaged after the save)"
        )
    return True


def parse_strict(raw: bytes | str, where: str) -> object:
    """JSON as FORMAT.md allows it: UTF-8, no NaN/Infinity literals, no duplicate members.

    Numbers are parsed by the C decoder (a Python hook per number doubles the time); the
    index's validation bounds them where they are used: overflowing floats (``1e999``
    parses as infinity) and long ints are refused in values and metadata, and every
    structural int has a range.  Ints beyond Python's own digit limit fail here.
    """

    def fail(problem: str):
        raise IndexCorruptError(f"{where}: index is not valid JSON ({problem})")

    def pairs(members: list[tuple[str, object]]) -> dict:
        obj = dict(members)
        if len(obj) != len(members):
            seen: set[str] = set()
            dup = next(k for k, _ in members if k in seen or seen.add(k))
            fail(f"duplicate member {dup!r}")
        return obj

    def constant(name: str):
        fail(f"{name} is not JSON")

    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        return json.loads(
            text,
            object_pairs_hook=pairs,
            parse_constant=constant,
        )
    except UnicodeDecodeError as exc:
        fail(f"not UTF-8: {exc.reason} at byte {exc.start}")
    except RecursionError:
        fail("nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError included
        fail(str(exc))
