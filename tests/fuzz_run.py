"""Runs the read operations on fuzz cases in a forked worker and classifies each outcome.

Outcome classes, most serious first (an outcome takes the first that applies):

* ``hang``: the operation passed its deadline (the worker is killed and forked again);
* ``crash``: the worker died (a signal, the OOM killer);
* ``escape``: a file outside the checkpoint was opened (audit hook on ``open``) or read
  (its atime moved: native readers bypass the hook);
* ``allocation``: peak RSS grew by more than ``ALLOC_BOUND`` or an allocation failed
  under the worker's address-space limit;
* ``target_modified``: a failed ``load``/``load_hf`` changed its target;
* ``raw_exception``: anything raised that is not a ``StashpointError``;
* ``silent_wrong``: it succeeded with values that differ from the original's, or
  ``verify`` passed a checkpoint that a read operation could not read correctly;
* ``rejected_valid``: an error on a checkpoint whose bytes are the original's;
* ``named_error``: a ``StashpointError`` (or ``verify`` listing problems, exit status != 0);
* ``unverifiable``: a changed tensor element in a format that records no checksums (HF, DCP);
* ``ok``: succeeded with the original's values.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import io
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

import stashpoint
from fuzz_cases import Case, Original, make_model, make_state, materialize
from fuzz_json import hf_self_consistent
from stashpoint.errors import StashpointError

CLASSES = (
    "hang",
    "crash",
    "escape",
    "allocation",
    "target_modified",
    "raw_exception",
    "silent_wrong",
    "rejected_valid",
    "named_error",
    "unverifiable",
    "ok",
)
FAILURES = ("hang", "crash", "escape", "allocation", "target_modified", "raw_exception", "silent_wrong")
READS = ("load", "load_hf", "load_full", "iter_full", "read_index")
ALLOC_BOUND = 256 << 20
ADDRESS_SLACK = 2 << 30


def ops_for(orig: Original) -> tuple[str, ...]:
    first = "load_hf" if orig.fmt == "hf" else "load"
    return (first, "load_full", "iter_full", "read_index", "verify", "cli_verify")


# --- the operations ---------------------------------------------------------------------------


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, stashpoint.PerRank):
        return _clone(value.value)  # a load may replace the wrapper by the value
    if isinstance(value, torch.nn.Module | torch.optim.Optimizer):
        return _clone(value.state_dict())
    return copy.deepcopy(value)


def _target(orig: Original) -> dict:
    if orig.fmt == "dcp":
        return {"model": make_model(1)}
    return make_state(1)


def _load(orig: Original, path: str, out: dict) -> object:
    state = _target(orig)
    out["before"] = _clone(state)
    out["state"] = state
    per_rank = "rank0" if orig.world_size > 1 else "error"
    stashpoint.load(state, path, per_rank=per_rank)
    return _clone(state)


def _load_hf(orig: Original, path: str, out: dict) -> object:
    from stashpoint.convert import load_hf

    module = make_model(1)
    out["before"] = _clone(module)
    out["state"] = module
    load_hf(module, path)
    return _clone(module)


def _verify(orig: Original, path: str, out: dict) -> object:
    from stashpoint.engine.verify import verify_checkpoint

    report = verify_checkpoint(path)
    if not report.ok:
        raise Detected("; ".join(report.problems)[:300])
    return None


def _cli_verify(orig: Original, path: str, out: dict) -> object:
    from stashpoint.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()) as so, contextlib.redirect_stderr(io.StringIO()) as se:
        rc = main(["verify", path])
    if rc != 0:
        raise Detected(f"exit {rc}: {(se.getvalue() or so.getvalue())[-300:]}")
    return None


def _strip_positions(value: object) -> object:
    """An index without byte positions: other tools' files move them with their headers."""
    if isinstance(value, dict):
        return {k: _strip_positions(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_strip_positions(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _strip_positions(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if "byte_range" in fields:
            fields["byte_range"] = None
        return dataclasses.replace(value, **fields)
    return value


def _read_index(orig: Original, path: str, out: dict) -> object:
    index = stashpoint.read_index(path)
    return index if orig.fmt == "stashpoint" else _strip_positions(index)


OPS = {
    "load": _load,
    "load_hf": _load_hf,
    "load_full": lambda o, p, out: stashpoint.load_full(p, per_rank="all"),
    "iter_full": lambda o, p, out: list(stashpoint.iter_full(p, per_rank="all")),
    "read_index": _read_index,
    "verify": _verify,
    "cli_verify": _cli_verify,
}


class Detected(Exception):
    """``verify`` found problems: the wanted outcome for a damaged checkpoint."""


def same(a: object, b: object) -> bool:
    """Bit-exact equality of results: tensors by dtype, shape and bytes; types must match."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


# --- one operation inside the worker ------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    kind: str
    original: str
    op: str
    cls: str = "ok"
    exc: str = ""
    where: str = ""
    origin: str = ""
    message: str = ""
    detail: str = ""
    flags: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Canary:
    """Notices reads of the files under ``root`` (audit hook on open, and atime)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root) + os.sep
        self.files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        self.armed = False
        self.hits: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.armed or event != "open" or not args or isinstance(args[0], int):
            return
        self.armed = False  # realpath below must not re-enter
        try:
            if os.path.realpath(os.fsdecode(args[0])).startswith(self.root):
                self.hits.append(os.fsdecode(args[0]))
        finally:
            self.armed = True

    def arm(self) -> None:
        self.hits = []
        for f in self.files:
            st = os.stat(f)
            os.utime(f, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns))
        self.atimes = [os.stat(f).st_atime_ns for f in self.files]
        self.armed = True

    def disarm(self) -> list[str]:
        self.armed = False
        moved = [f for f, t in zip(self.files, self.atimes) if os.stat(f).st_atime_ns != t]
        return self.hits + [f"read {f}" for f in moved]


def _frames(tb) -> tuple[str, str]:
    """The innermost stashpoint frame and the innermost frame overall, as file:line."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f"{os.sep}stashpoint{os.sep}" in f.filename]

    def short(f) -> str:
        name = f.filename
        cut = name.rfind(f"{os.sep}stashpoint{os.sep}")
        return f"{name[cut + 1 :] if cut >= 0 else os.path.basename(name)}:{f.lineno}"

    return (short(ours[-1]) if ours else "", short(frames[-1]) if frames else "")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_op(orig: Original, op: str, path: str, ref: object, canary: _Canary, out: Outcome) -> Outcome:
    scratch: dict = {}
    peak = _peak_rss()
    canary.arm()
    start = time.perf_counter()
    try:
        result = OPS[op](orig, path, scratch)
        if ref is not None and not same(result, ref):
            out.cls, out.message = "silent_wrong", "values differ from the original"
    except Detected as exc:
        out.cls, out.exc, out.message = "named_error", "verify", str(exc)
    except BaseException as exc:  # everything is classified, nothing escapes the worker
        out.exc, out.message = type(exc).__name__, str(exc)[:300]
        out.where, out.origin = _frames(exc.__traceback__)
        out.cls = "named_error" if isinstance(exc, StashpointError) else "raw_exception"
        if isinstance(exc, MemoryError) or (type(exc) is RuntimeError and "can't allocate" in out.message):
            out.flags.append("allocation")
        if "state" in scratch and not same(_clone(scratch["state"]), scratch["before"]):
            out.flags.append("target_modified")
    out.seconds = time.perf_counter() - start
    hits = canary.disarm()
    if hits:
        out.flags.append("escape")
        out.message = f"{out.message} | opened {hits[0]}"
    if _peak_rss() - peak > ALLOC_BOUND:
        out.flags.append("allocation")
    for cls in ("escape", "allocation", "target_modified"):
        if cls in out.flags:
            out.cls = cls
            break
    return out


def _worker(conn, originals: dict[str, Original], refs: dict, canary_root: str) -> None:
    os.environ["STASHPOINT_TELEMETRY"] = ""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX: keep the address space small
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_SLACK, resource.RLIM_INFINITY))
    canary = _Canary(canary_root)
    while True:
        msg = conn.recv()
        if msg is None:
            os._exit(0)
        name, op, path, base = msg
        conn.send(run_op(originals[name], op, path, refs.get((name, op)), canary, base))


# --- the parent side ---------------------------------------------------------------------------


class Runner:
    """A forked worker that runs operations with a deadline each, forked again after a hang."""

    def __init__(self, originals: dict[str, Original], canary_root: str, deadline_s: float) -> None:
        self.originals, self.canary_root, self.deadline_s = originals, canary_root, deadline_s
        self.refs = {(o.name, op): _reference(o, op) for o in originals.values() for op in ops_for(o)}
        self.proc = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker, args=(child, self.originals, self.refs, self.canary_root), daemon=True
        )
        self.proc.start()
        child.close()

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.proc = None

    def run(self, name: str, op: str, path: str, base: Outcome) -> Outcome:
        if self.proc is None:
            self._start()
        self.conn.send((name, op, path, base))
        if self.conn.poll(self.deadline_s):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        else:
            self._kill()
            return dataclasses.replace(base, cls="hang", message=f"no answer in {self.deadline_s} s")
        code = self.proc.exitcode
        self._kill()
        return dataclasses.replace(base, cls="crash", message=f"worker died ({code})")

    def close(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self._kill()


def _reference(orig: Original, op: str) -> object:
    """The operation's result on the untouched original (None for verify)."""
    result = OPS[op](orig, orig.path, {})
    if op == "load" and orig.fmt == "stashpoint":
        saved = _clone(make_state(0))
        assert same(result, saved), f"{orig.name}: load does not give back what was saved"
    return result


def payload_ranges(orig: Original) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of tensor elements per file, from the original's index."""
    from stashpoint.format.index import iter_chunks

    ranges: dict[str, list] = {}
    for _, chunk in iter_chunks(stashpoint.read_index(orig.path)):
        ranges.setdefault(chunk.file, []).append(tuple(chunk.byte_range))
    return ranges


def run_case(runner: Runner, case: Case, workdir: str, canary: str, payload: dict) -> list[Outcome]:
    """Materialize ``case`` under ``workdir``, run every operation, and classify."""
    orig = runner.originals[case.original]
    path = os.path.join(workdir, case.id.replace(":", "_").replace(".", "_"))
    applied = materialize(case, orig, path, canary, payload.get(orig.name, {}))
    outcomes = []
    # a change a strict reader accepts: verify rightly passes it, even where a load into
    # the original's target then fails (e.g. with a shape mismatch)
    consistent = orig.fmt == "hf" and hf_self_consistent(path)
    for op in ops_for(orig):
        base = Outcome(case=case.id, kind=case.kind, original=case.original, op=op, detail=applied.detail)
        out = runner.run(case.original, op, path, base)
        if case.kind == "none" and out.cls in ("named_error",):
            out.cls = "rejected_valid"
        if out.cls == "silent_wrong" and orig.fmt != "stashpoint":
            if applied.payload_only or consistent:
                out.cls = "unverifiable"  # a change that the format gives no means to notice
        outcomes.append(out)
    damaged = not consistent and any(o.op in READS and o.cls not in ("ok", "unverifiable") for o in outcomes)
    for o in outcomes:
        if o.op in ("verify", "cli_verify") and o.cls == "ok" and damaged:
            o.cls, o.message = "silent_wrong", "verify passed a checkpoint the reads got wrong"
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        os.unlink(path)
    return outcomes


def run_all(
    root: str, two_ranks, seed: int, per_kind: int, deadline_s: float, progress=None, fast: bool = False
) -> list[Outcome]:
    """Build the originals under ``root``, list the cases and run them (``fast``: a subset)."""
    from fuzz_cases import build_originals, fast_subset, list_cases, make_canary

    originals = build_originals(os.path.join(root, "originals"), two_ranks)
    canary = make_canary(root, originals)
    payload = {o.name: payload_ranges(o) for o in originals.values()}
    cases = list_cases(originals, seed, per_kind)
    if fast:
        cases = fast_subset(originals, cases, seed)
    workdir = os.path.join(root, "cases")
    os.makedirs(workdir)
    runner = Runner(originals, canary, deadline_s)
    outcomes: list[Outcome] = []
    try:
        for i, case in enumerate(cases):
            outcomes += run_case(runner, case, workdir, canary, payload)
            if progress is not None:
                progress(i + 1, len(cases), outcomes)
    finally:
        runner.close()
    return outcomes
