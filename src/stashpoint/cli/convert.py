"""``stashpoint convert SRC DST --to hf|dcp|stashpoint``: arguments in, :func:`stashpoint.convert` out."""

from __future__ import annotations

import argparse
import os
import sys
import time

from stashpoint.sizes import parse_size
from stashpoint.textfmt import human_bytes


class Progress:
    """A one-line progress bar on stderr: tensors and bytes done out of the total."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.done, self.count = max(total_bytes, 1), 0, 0
        self.enabled = enabled
        self._last = 0.0
        self._t0 = time.perf_counter()

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += nbytes
        self.count += 1
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self._t0, 1e-9)
            sys.stderr.write(
                f"\r[{bar:<30}] {frac:6.1%} {human_bytes(self.done)} of {human_bytes(self.total)} "
                f"({human_bytes(rate)}/s) {self.count} tensors"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.count:
            sys.stderr.write("\n")


def _total_bytes(src: str) -> int:
    """What the progress bar counts up to: the source's size on disk (tensor bytes plus a
    little framing), so that no index has to be read twice just to draw a bar."""
    if os.path.isfile(src):
        return os.path.getsize(src)
    if os.path.isdir(src):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(src) for f in files)
    import stashpoint

    return stashpoint.read_index(src).total_bytes


def run(args: argparse.Namespace) -> int:
    from stashpoint.convert import convert

    progress = Progress(_total_bytes(args.src), enabled=not args.no_progress and sys.stderr.isatty())
    try:
        summary = convert(
            args.src,
            args.dst,
            to=args.to,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            prefix=args.prefix,
            max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"),
            dtype=args.dtype,
            copy_files=tuple(args.copy),
            copy_from=os.getcwd(),  # --copy names are relative to the working directory
            progress=progress,
        )
    finally:
        progress.close()
    print(
        f"{summary.tensors} tensors, {summary.values} values, {human_bytes(summary.bytes)} in "
        f"{summary.files} file(s), {summary.seconds:.2f} s, peak memory "
        f"{human_bytes(summary.peak_rss_bytes)}; {len(summary.skipped)} items left out"
    )
    return 0
