"""``stashpoint convert SRC DST --to hf|stashpoint``."""

from __future__ import annotations

import argparse

from stashpoint.cli.format import human_bytes

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    return int(t)


def run(args: argparse.Namespace) -> int:
    import torch

    from stashpoint.convert import export_hf, import_hf, strip_prefix

    if args.to == "hf":
        summary = export_hf(
            args.src,
            args.dst,
            name_map=strip_prefix(args.prefix),
            max_shard_bytes=parse_size(args.max_shard_size),
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            copy_files=tuple(args.copy),
        )
    else:
        summary = import_hf(args.src, args.dst, prefix=args.prefix)
    print(
        f"{summary.tensors} tensors, {human_bytes(summary.bytes)} in {summary.files} file(s), "
        f"{summary.seconds:.2f} s; {len(summary.skipped)} items left out"
    )
    return 0
