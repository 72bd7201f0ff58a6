"""Sizes written by people: the one parser, with one unit rule.

A size is a whole or decimal number followed by an optional unit, case-insensitive,
spaces allowed between them:

* no unit or ``B``: bytes;
* ``KB``, ``MB``, ``GB``, ``TB``: powers of 1000 (as disks and HF's ``max_shard_size``
  count);
* ``KiB``, ``MiB``, ``GiB``, ``TiB``: powers of 1024.

Anything else (``"5G"``, ``"-1"``, ``"lots"``) raises
:class:`~stashpoint.errors.InvalidOptionError` naming the option.  Torch-free.
"""

from __future__ import annotations

import math
import re

from stashpoint.errors import InvalidOptionError

UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int, option: str = "size") -> int:
    """Bytes in ``text`` (``"5GB"``, ``"16MiB"``, ``"1048576"``); an int is returned as is."""
    if isinstance(text, bool):
        raise InvalidOptionError(f"{option}: {text!r} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise InvalidOptionError(f"{option}: a size cannot be negative ({text})")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise InvalidOptionError(
            f"{option}: cannot read {text!r} as a size (use e.g. 1048576, 500MB, 16MiB, 5GB, 1GiB)"
        )
    value = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(value):
        raise InvalidOptionError(f"{option}: {text!r} is too large")
    return int(value)
