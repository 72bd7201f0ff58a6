"""``stashpoint`` command: subcommands import their code only when run.

Every error is one line on stderr, ``stashpoint COMMAND: ErrorName: message`` in the
command's own flags; the exit code is 2 when the command was asked wrongly and 1 when
it failed (see :mod:`stashpoint.cli.failures`).
"""

from __future__ import annotations

import argparse
import sys

from stashpoint._version import __version__
from stashpoint.cli.failures import USAGE, explain
from stashpoint.engine.shm import reclaim_orphans


class Parser(argparse.ArgumentParser):
    """An argument parser that remembers each option's flag and reports misuse in one line."""

    def __init__(self, *args, **kwargs) -> None:
        #: option name (``dest``) -> its flag, e.g. ``allow_pickle`` -> ``--allow-pickle``
        self.flags: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.flags[action.dest] = max(action.option_strings, key=len)
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(USAGE)


def _inspect(args: argparse.Namespace) -> int:
    from stashpoint.cli.inspect import run

    return run(args.path, as_json=args.json, against=args.names_against)


def _verify(args: argparse.Namespace) -> int:
    from stashpoint.cli.verify import run

    return run(args.path)


def _convert(args: argparse.Namespace) -> int:
    from stashpoint.cli.convert import run

    return run(args)


def _merge(args: argparse.Namespace) -> int:
    from stashpoint.cli.merge import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from stashpoint.cli.report import run

    return run(args.files, plot=args.plot)


def _demo(args: argparse.Namespace) -> int:
    from stashpoint.demo.run import run

    return run(
        out_dir=args.dir,
        steps=args.steps,
        save_at=args.save_at,
        save_world=args.save_world,
        resume_world=args.resume_world,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="stashpoint", description="Checkpoints for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"stashpoint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("inspect", help="show what a checkpoint holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--names-against",
        metavar="OTHER",
        help="names a load into checkpoint OTHER's names would find missing, unexpected, renamed",
    )
    p.set_defaults(func=_inspect, flags=p.flags)

    p = sub.add_parser("verify", help="check every chunk's checksum and the index")
    p.add_argument("path")
    p.set_defaults(func=_verify, flags=p.flags)

    p = sub.add_parser("convert", help="between stashpoint, HF safetensors, DCP and torch.save")
    p.add_argument("src", help="a stashpoint, DCP or HF directory, or a torch.save file (.pt/.bin)")
    p.add_argument("dst")
    p.add_argument("--to", choices=["hf", "dcp", "stashpoint"], required=True)
    p.add_argument("--allow-pickle", action="store_true", help="trust SRC: read values that need unpickling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest shard, e.g. 2GB, 500MB")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="hf: cast floating tensors")
    p.add_argument("--prefix", default="model.", help="names under this prefix are the model's")
    p.add_argument("--copy", nargs="*", default=[], help="hf: files to copy along (config.json, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert, flags=p.flags)

    p = sub.add_parser("merge", help="average or merge checkpoints (mergekit-style YAML or flags)")
    from stashpoint.cli.merge import add_arguments

    add_arguments(p)
    p.set_defaults(func=_merge, flags=p.flags)

    p = sub.add_parser("report", help="table and timeline plot of save/load telemetry (JSON lines)")
    p.add_argument("files", nargs="+", help="telemetry .jsonl files")
    p.add_argument("--plot", metavar="OUT.png", help="also draw a timeline")
    p.set_defaults(func=_report, flags=p.flags)

    p = sub.add_parser(
        "demo", help="train on 2 ranks, SIGKILL a rank, recover from memory, reshard to 3, compare"
    )
    p.add_argument("--dir", default="demo-output", help="where checkpoints go (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--save-at", type=int, default=8)
    p.add_argument("--save-world", type=int, default=2)
    p.add_argument("--resume-world", type=int, default=3)
    p.set_defaults(func=_demo, flags=p.flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reclaim_orphans()  # staging memory of killed writers: torch-free, a directory listing
    try:
        return args.func(args)
    except Exception as exc:
        failure = explain(exc, args.flags)
        if failure is None:
            raise  # not an error the command reports: a defect, shown with its traceback
        print(f"stashpoint {args.command}: {failure.message}", file=sys.stderr)
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
