"""Synchronous distributed save.

Call order (every rank calls :func:`save_state` with the same path):

1. each rank flattens its state and describes what it holds (an inventory);
   inventories are exchanged over gloo and every rank computes the same
   :class:`~stashpoint.planning.save_plan.SavePlan` (:mod:`~stashpoint.engine.prepare`);
2. each rank writes its chunks into its own data file in the staging location and
   fsyncs it, puts the records of its chunks of grid tensors (every rank knows which
   from the plan: :func:`~stashpoint.planning.index_layout.plan_grids`) into its own
   index fragment, and reports only the rest and the fragment's digest;
3. the coordinator (rank 0) builds the index from the plan, the grids and those
   reports, writes it into the staging location and commits (atomic rename, or the
   index itself is the marker).

A failure on any rank makes every rank raise, and nothing is committed: the
previous checkpoint at the path, if any, is untouched.
"""

from __future__ import annotations

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.persist import save_grids
from stashpoint.engine.prepare import file_items, inline_values, prepare_save
from stashpoint.engine.publish import save_metadata
from stashpoint.engine.telemetry import PhaseTimer, SaveResult, env_telemetry
from stashpoint.errors import InvalidStateError
from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
from stashpoint.storage import resolve
from stashpoint.storage.commit import CommitStrategy


def check_save_args(metadata: dict | None, crc_block_bytes: int) -> dict:
    user = dict(metadata or {})
    if not _state.is_exact_json(user):
        raise InvalidStateError("metadata must be a JSON-serialisable dict with string keys")
    if crc_block_bytes <= 0 or crc_block_bytes % 64:
        raise ValueError("crc_block_bytes must be a positive multiple of 64")
    return user


def save_state(
    state: dict,
    path: str,
    *,
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
    commit: CommitStrategy | None = None,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
    allow_pickle: bool = False,
) -> SaveResult:
    timer = PhaseTimer()
    user = check_save_args(metadata, crc_block_bytes)
    coord = Coordinator(process_group, timeout_s)
    storage, final = resolve(path)

    prepared = prepare_save(state, coord, storage, final, commit, overwrite, allow_pickle, timer=timer)
    plan, publisher = prepared.plan, prepared.publisher
    writes = plan.writes[coord.rank]
    with timer.phase("grids"):  # the index's grids (reused with a reused plan)
        grids = save_grids(plan)

    def write():
        items = file_items(writes, prepared.sources)
        written, size = publisher.write_file(coord.rank, items, crc_block_bytes, timer)
        kept = publisher.write_fragment(coord.rank, written, grids)
        return kept + inline_values(writes, prepared.sources), size

    def finish():
        if not coord.is_coordinator:
            return None
        meta = save_metadata(coord.world_size, step, user, publisher.token, prepared.layouts)
        contributions = [r[0] for r in results]
        return publisher.finish(plan.items, contributions, meta, crc_block_bytes, timer, grids).total_bytes

    try:
        results = coord.run_everywhere("save: write data", write).everyone
        total = coord.run_everywhere("save: commit", finish).everyone[0]
    except BaseException:
        if coord.is_coordinator:
            publisher.abort()
        raise
    result = SaveResult(
        path=publisher.where,
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_written=results[coord.rank][1],
        total_bytes=total,
        phase_seconds=dict(timer.seconds),
    )
    env_telemetry("save", result, mode="sync", step=step)
    return result
