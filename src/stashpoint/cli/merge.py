"""``stashpoint merge CONFIG.yaml OUT`` or ``stashpoint merge --method M CKPT... -o OUT``."""

from __future__ import annotations

import argparse
import json
import sys

from stashpoint.errors import MergeConfigError
from stashpoint.sizes import parse_size
from stashpoint.textfmt import human_bytes

#: flags that set a method parameter of the same name
PARAM_FLAGS = (
    "decay",
    "k",
    "t",
    "density",
    "lambda",
    "schedule",
    "metric",
    "penalty",
    "seed",
    "threshold",
    "power",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="CONFIG.yaml [OUT], or the checkpoints to merge with --method")
    p.add_argument(
        "-o", "--out", help="output path (a stashpoint checkpoint, or an HF directory with --format hf)"
    )
    p.add_argument("--method", help="merge method for a merge given by flags (see --list-methods)")
    p.add_argument("--base", help="base model (task arithmetic, TIES, DARE, model stock, curvature)")
    p.add_argument("--weights", help="comma-separated weight per input, e.g. 0.2,0.3,0.5")
    p.add_argument("--decay", type=float, help="ema: decay per checkpoint")
    p.add_argument("--k", type=int, help="lawa: how many of the last checkpoints")
    p.add_argument("--t", type=float, help="slerp: interpolation factor")
    p.add_argument("--density", type=float, help="ties/dare: fraction of each delta kept")
    p.add_argument("--lambda", type=float, dest="lambda_", help="scale of the merged delta")
    p.add_argument("--schedule", choices=["linear", "1-sqrt"], help="wsm: decay schedule")
    p.add_argument("--metric", choices=["loss", "step"], help="metrics: what weights come from")
    p.add_argument("--penalty", type=float, help="metrics: exponent (0 gives uniform)")
    p.add_argument("--seed", type=int, help="dare/lcsc: random seed")
    p.add_argument("--threshold", type=float, help="curvature: mask edits with v*delta^2 below this")
    p.add_argument("--power", type=float, help="curvature: exponent of exp_avg_sq")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any method parameter")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], help="compute dtype")
    p.add_argument("--out-dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--missing", choices=["error", "intersection", "union"], help="tensors not in every input")
    p.add_argument("--format", choices=["stashpoint", "hf"], dest="output_format", help="output format")
    p.add_argument("--max-shard-size", help="hf output: largest shard, e.g. 2GB")
    p.add_argument("--device", help="where the arithmetic runs (cpu, cuda, cuda:1)")
    p.add_argument("--eval", dest="evaluate", help="greedy_soup/lcsc: command; {path} is the candidate")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--report", metavar="FILE.json", help="write the full report (tensor lists) as JSON")
    p.add_argument("--list-methods", action="store_true", help="list the merge methods and exit")


def _value(text: str) -> bool | int | float | str:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parameters(args: argparse.Namespace) -> dict[str, bool | int | float | str]:
    out: dict[str, bool | int | float | str] = {}
    for name in PARAM_FLAGS:
        value = getattr(args, "lambda_" if name == "lambda" else name)
        if value is not None:
            out[name] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergeConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value)
    return out


def _list_methods() -> int:
    from stashpoint.merging.registry import METHODS, get_method

    get_method("linear")
    for name in sorted(METHODS):
        spec = METHODS[name]
        alias = f" (alias of {spec.name})" if name != spec.name else ""
        print(f"{name:16s} {spec.summary}{alias}")
    return 0


def run(args: argparse.Namespace) -> int:
    from stashpoint.merging import build_config, merge

    if args.list_methods:
        return _list_methods()
    params = _parameters(args)
    if args.method:
        out, config = args.out, None
        models: list[object] = list(args.inputs)
        if args.weights:
            ws = [float(w) for w in args.weights.split(",")]
            if len(ws) != len(models):
                raise MergeConfigError(f"--weights has {len(ws)} values for {len(models)} inputs")
            models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, ws)]
        doc: dict[str, object] = {"merge_method": args.method, "models": models}
    else:
        if args.weights:
            raise MergeConfigError("--weights goes with --method; in a YAML file give each model a weight")
        if len(args.inputs) not in (1, 2) or (len(args.inputs) == 1) == (args.out is None):
            raise MergeConfigError("usage: stashpoint merge CONFIG.yaml OUT, or --method M CKPT... -o OUT")
        config = args.inputs[0]
        out = args.inputs[1] if len(args.inputs) == 2 else args.out
        from stashpoint.merging.config import load_config

        doc = load_config(config)
    if out is None:
        raise MergeConfigError("no output path: give -o OUT")
    if args.max_shard_size:
        doc["max_shard_size"] = parse_size(args.max_shard_size, "--max-shard-size")
    if args.evaluate:
        doc["evaluate"] = args.evaluate
    cfg = build_config(
        doc,
        base_model=args.base,
        parameters=params or None,
        dtype=args.dtype,
        out_dtype=args.out_dtype,
        missing=args.missing,
        output_format=args.output_format,
        device=args.device,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    report = merge(cfg, out, overwrite=args.overwrite, progress=progress)
    rate = report.read_gb_per_s
    print(
        f"{cfg.method}: merged {len(report.merged)} tensors, copied {len(report.copied)}, "
        f"skipped {len(report.skipped)}; read {human_bytes(report.bytes_read)} in {report.seconds:.2f} s "
        f"({rate:.2f} GB/s), wrote {human_bytes(report.bytes_written)} to {out}"
    )
    if report.weights is not None:
        print("weights: " + ", ".join(f"{w:.6g}" for w in report.weights))
    if report.search is not None:
        print(f"search: best score {report.search.score:.6g} after {len(report.search.history)} evaluations")
    for note in report.notes:
        print(f"note: {note}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0
