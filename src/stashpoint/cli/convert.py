"""``stashpoint convert SRC DST --to hf|dcp|stashpoint``: any supported source, streamed."""

from __future__ import annotations

import argparse
import os
import sys
import time

from stashpoint.cli.format import human_bytes
from stashpoint.sizes import parse_size


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


def source_kind(src: str) -> str:
    """ "torch" for a torch.save file or pytorch_model.bin directory, else "checkpoint"."""
    if os.path.isfile(src):
        return "torch"
    if os.path.isdir(src) and not any(
        os.path.exists(os.path.join(src, n))
        for n in ("index.json", ".metadata", "model.safetensors", "model.safetensors.index.json")
    ):
        from stashpoint.convert.torch_save import BIN_INDEX

        if any(os.path.exists(os.path.join(src, n)) for n in (BIN_INDEX, "pytorch_model.bin")):
            return "torch"
    return "checkpoint"


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
    import torch

    from stashpoint.convert import export_dcp, export_hf, import_torch_save, strip_prefix
    from stashpoint.convert.stream import copy_to_stashpoint

    progress = Progress(_total_bytes(args.src), enabled=not args.no_progress and sys.stderr.isatty())
    kind = source_kind(args.src)
    src = args.src
    tmp = None
    try:
        if kind == "torch" and args.to != "stashpoint":
            # torch.save files are turned into a stashpoint checkpoint first, then exported
            import tempfile

            tmp = tempfile.mkdtemp(prefix="stashpoint-convert-")
            src = os.path.join(tmp, "ckpt")
            import_torch_save(args.src, src, prefix=args.prefix, allow_pickle=args.allow_pickle)
        if args.to == "hf":
            summary = export_hf(
                src,
                args.dst,
                name_map=strip_prefix(args.prefix),
                max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"),
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                copy_files=tuple(args.copy),
                progress=progress,
            )
        elif args.to == "dcp":
            summary = export_dcp(src, args.dst, allow_pickle=args.allow_pickle, progress=progress)
        elif kind == "torch":
            summary = import_torch_save(
                src, args.dst, prefix=args.prefix, allow_pickle=args.allow_pickle, progress=progress
            )
        else:
            # HF names gain the model prefix so the result loads into {"model": module}
            rename = (lambda n: args.prefix + n) if _is_hf(src) else None
            summary = copy_to_stashpoint(
                src,
                args.dst,
                source="convert",
                rename=rename,
                allow_pickle=args.allow_pickle,
                progress=progress,
            )
    finally:
        progress.close()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{summary.tensors} tensors, {summary.values} values, {human_bytes(summary.bytes)} in "
        f"{summary.files} file(s), {summary.seconds:.2f} s, peak memory "
        f"{human_bytes(summary.peak_rss_bytes)}; {len(summary.skipped)} items left out"
    )
    return 0


def _is_hf(src: str) -> bool:
    from stashpoint.foreign import detect_format
    from stashpoint.storage import resolve

    return detect_format(*resolve(src)) == "hf"
