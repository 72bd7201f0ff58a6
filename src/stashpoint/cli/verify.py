"""``stashpoint verify PATH``: read every byte back and check it; exit 1 on any problem."""

from __future__ import annotations

from stashpoint.cli.inspect import no_checkpoint
from stashpoint.errors import CheckpointNotFoundError, IncompleteCheckpointError
from stashpoint.storage import resolve
from stashpoint.textfmt import human_bytes


def run(path: str) -> int:
    from stashpoint.engine.verify import verify_checkpoint

    try:
        report = verify_checkpoint(path)
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        raise no_checkpoint(*resolve(path)) from None
    for problem in report.problems:
        print(f"FAIL  {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    if not report.checksums:
        print(
            f"{report.path}: {status}; {report.chunks} chunks present (no checksums recorded in this format)"
        )
        return 0 if report.ok else 1
    print(f"{report.path}: {status}; {report.chunks} chunks, {human_bytes(report.bytes_checked)} checked")
    if report.index_checksum:
        print("index: checksum verified")
    else:
        print("index: unverified (written by format version 1, which records no index checksum)")
    return 0 if report.ok else 1
