"""``stashpoint`` command: subcommands import their code only when run."""

from __future__ import annotations

import argparse
import sys


def _inspect(args: argparse.Namespace) -> int:
    from stashpoint.cli.inspect import run

    return run(args.path, as_json=args.json)


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
    parser = argparse.ArgumentParser(prog="stashpoint", description="Checkpoints for PyTorch training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a checkpoint holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check every chunk's checksum and the index")
    p.add_argument("path")
    p.set_defaults(func=_verify)

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
    p.set_defaults(func=_convert)

    p = sub.add_parser("merge", help="average or merge checkpoints (mergekit-style YAML or flags)")
    from stashpoint.cli.merge import add_arguments

    add_arguments(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("report", help="table and timeline plot of save/load telemetry (JSON lines)")
    p.add_argument("files", nargs="+", help="telemetry .jsonl files")
    p.add_argument("--plot", metavar="OUT.png", help="also draw a timeline")
    p.set_defaults(func=_report)

    p = sub.add_parser("demo", help="train on 2 ranks, checkpoint, resume on 3, compare")
    p.add_argument("--dir", default="demo-output", help="where checkpoints go (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--save-at", type=int, default=8)
    p.add_argument("--save-world", type=int, default=2)
    p.add_argument("--resume-world", type=int, default=3)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stashpoint.errors import StashpointError

    try:
        return args.func(args)
    except StashpointError as exc:
        print(f"stashpoint {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
