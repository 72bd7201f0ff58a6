"""The command line speaks in flags: one-line errors, exit codes, --version, --overwrite,
inspect without torch and on things that are not checkpoints, report's phase order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stashpoint
from stashpoint.cli.failures import explain, one_line
from stashpoint.cli.main import main
from stashpoint.errors import EvaluationError

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


class Opaque:
    """A value only a full unpickler can read."""

    def __init__(self, n: int) -> None:
        self.n = n


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """Run ``stashpoint ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "Traceback" not in err and "\x1b" not in err
    return err


@pytest.fixture
def ckpt(tmp_path) -> str:
    path = str(tmp_path / "c")
    stashpoint.save({"model": torch.nn.Linear(3, 2), "loader": {"pos": 3}}, path, step=7)
    return path


def test_version(capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"stashpoint {stashpoint.__version__}"


def test_usage_errors_are_one_line_and_exit_2(capsys, ckpt, tmp_path):
    code, _, err = cli(capsys, "convert", ckpt)
    assert code == 2 and "--to" in one_error_line(err)
    code, _, err = cli(capsys, "convert", ckpt, tmp_path / "hf", "--to", "hf", "--max-shard-size", "5G")
    assert code == 2 and "--max-shard-size" in one_error_line(err) and "max_shard_size" not in err
    assert not (tmp_path / "hf").exists()
    code, _, err = cli(capsys, "demo", "--steps", "2", "--save-at", "5")
    assert code == 2 and "--save-at" in one_error_line(err)


def test_convert_and_merge_refuse_to_replace_without_overwrite(capsys, ckpt, tmp_path):
    out = tmp_path / "hf"
    assert cli(capsys, "convert", ckpt, out, "--to", "hf")[0] == 0
    code, _, err = cli(capsys, "convert", ckpt, out, "--to", "hf")
    assert code == 1 and "CheckpointExistsError" in one_error_line(err)
    assert "--overwrite" in err and "overwrite=True" not in err
    assert cli(capsys, "convert", ckpt, out, "--to", "hf", "--overwrite")[0] == 0
    merged = tmp_path / "m"
    assert cli(capsys, "merge", "--method", "linear", ckpt, ckpt, "-o", merged)[0] == 0
    code, _, err = cli(capsys, "merge", "--method", "linear", ckpt, ckpt, "-o", merged)
    assert code == 1 and "--overwrite" in one_error_line(err) and "overwrite=True" not in err
    assert cli(capsys, "merge", "--method", "linear", ckpt, ckpt, "-o", merged, "--overwrite")[0] == 0


def test_pickle_refusal_names_the_flag(capsys, tmp_path):
    torch.save({"w": torch.ones(2), "obj": Opaque(1)}, tmp_path / "obj.pt")
    code, _, err = cli(capsys, "convert", tmp_path / "obj.pt", tmp_path / "c", "--to", "stashpoint")
    assert code == 1 and "PickleNotAllowedError" in one_error_line(err)
    assert "--allow-pickle" in err and "allow_pickle" not in err
    assert not (tmp_path / "c").exists()


def test_foreign_text_in_a_message_is_cut_to_one_plain_line():
    pasted = (
        "evaluation command 'ev' exited 1 on /x: \x1b[31mTraceback (most recent call last):\n"
        '  File "ev.py", line 3, in <module>\n    main()\n\x1b[1mValueError: no GPU\x1b[0m\n'
    )
    assert one_line(pasted) == "evaluation command 'ev' exited 1 on /x:; ValueError: no GPU"
    failure = explain(EvaluationError(pasted), {})
    assert failure is not None and failure.code == 1
    assert failure.message == "EvaluationError: evaluation command 'ev' exited 1 on /x:; ValueError: no GPU"
    assert explain(RuntimeError("a defect"), {}) is None  # shown with its traceback


def test_evaluation_command_output_reaches_the_user_in_one_line(capsys, ckpt, tmp_path):
    script = tmp_path / "ev.py"
    script.write_text(
        "import sys\n"
        'sys.stderr.write(\'\\x1b[31mTraceback (most recent call last):\\n  File "ev.py"\\n'
        "ValueError: no GPU\\x1b[0m\\n')\n"
        "sys.exit(3)\n"
    )
    code, _, err = cli(
        capsys, "merge", "--method", "greedy_soup", ckpt, ckpt, "-o", tmp_path / "s", "--eval",
        f"{sys.executable} {script} {{path}}",
    )  # fmt: skip
    assert code == 1 and "EvaluationError" in one_error_line(err)
    assert "exited 3" in err and "ValueError: no GPU" in err


def test_report_failures_are_one_line(capsys, tmp_path):
    code, _, err = cli(capsys, "report", tmp_path / "missing.jsonl")
    assert code == 1 and "missing.jsonl" in one_error_line(err) and "No such file" in err
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == 1 and "directory" in one_error_line(err)


@pytest.mark.parametrize("missing, extra", [("matplotlib", "report"), ("boto3", "s3")])
def test_a_missing_optional_dependency_gives_the_install_hint(tmp_path, missing, extra):
    telemetry = tmp_path / "t.jsonl"
    telemetry.write_text(json.dumps(_record("save", 1, {"plan": 0.001, "write": 0.002})) + "\n")
    argv = {
        "matplotlib": ["report", str(telemetry), "--plot", str(tmp_path / "p.png")],
        "boto3": ["inspect", "s3://bucket/ckpt"],
    }[missing]
    code = (
        "import sys\n"
        f"sys.modules[{missing!r}] = None  # as if it were not installed\n"
        "from stashpoint.cli.main import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and not proc.stdout
    assert f"pip install 'stashpoint[{extra}]'" in one_error_line(proc.stderr)


def _record(event: str, step: int, phases: dict[str, float]) -> dict:
    return {
        "event": event,
        "step": step,
        "rank": 0,
        "phase_seconds": dict(sorted(phases.items())),  # as telemetry writes them: by name
        "seconds": sum(phases.values()),
        "time_unix": 1_700_000_000.0 + step,
        "bytes_written": 1 << 20,
    }


def test_report_lists_phases_in_the_order_they_happen(capsys, tmp_path):
    phases = {"commit": 0.004, "plan": 0.001, "write": 0.003, "fsync": 0.002, "checksum": 0.005}
    telemetry = tmp_path / "t.jsonl"
    telemetry.write_text(json.dumps(_record("save", 1, phases)) + "\n")
    code, out, _ = cli(capsys, "report", telemetry)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("save"))
    order = [row.index(f"{p}=") for p in ("plan", "checksum", "write", "fsync", "commit")]
    assert order == sorted(order), row


def test_inspect_does_not_import_torch(ckpt):
    code = (
        "import sys\n"
        "from stashpoint.cli.main import main\n"
        f"assert main(['inspect', {ckpt!r}]) == 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.weight" in proc.stdout and "step 7" in proc.stdout
    assert proc.stdout.strip().endswith("NO TORCH")


def test_inspect_tells_what_is_not_a_checkpoint(capsys, ckpt, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    for path in (notes, tmp_path / "empty"):
        os.makedirs(path, exist_ok=True)
        code, _, err = cli(capsys, "inspect", path)
        assert code == 1 and "NotACheckpointError" in one_error_line(err) and "not a checkpoint" in err
        assert "interrupted" not in err
    code, _, err = cli(capsys, "inspect", notes / "todo.txt")
    assert code == 1 and "NotACheckpointError" in one_error_line(err)
    code, _, err = cli(capsys, "inspect", tmp_path / "nothing")
    assert code == 1 and "CheckpointNotFoundError" in one_error_line(err)


def test_inspect_says_a_save_was_interrupted(capsys, ckpt, tmp_path):
    # what a killed save leaves: data files without the index (written in place) ...
    in_place = tmp_path / "in-place"
    shutil.copytree(ckpt, in_place)
    os.remove(in_place / "index.json")
    # ... or its hidden staging directory beside the checkpoint it never became
    shutil.copytree(in_place, tmp_path / ".staged.partial-1a2b3c")
    for path in (in_place, tmp_path / "staged"):
        code, _, err = cli(capsys, "inspect", path)
        assert code == 1 and "IncompleteCheckpointError" in one_error_line(err)
        assert "interrupted" in err and "not a checkpoint" not in err


def test_inspect_other_formats_shows_no_epoch_dates_or_empty_versions(capsys, ckpt, tmp_path):
    stashpoint.convert(ckpt, tmp_path / "hf", to="hf")
    stashpoint.convert(ckpt, tmp_path / "dcp", to="dcp")
    for path in (tmp_path / "hf", tmp_path / "dcp"):
        code, out, _ = cli(capsys, "inspect", path)
        assert code == 0 and "1970" not in out
        assert "torch unknown, stashpoint unknown" in out and "saved unknown" in out
        code, out, _ = cli(capsys, "inspect", path, "--json")
        meta = json.loads(out)["metadata"]
        assert meta["created"] is None and meta["torch_version"] is None
    code, out, _ = cli(capsys, "inspect", ckpt)
    assert f"stashpoint {stashpoint.__version__}" in out and "unknown" not in out
