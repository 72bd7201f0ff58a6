"""The memory tier on one node: where snapshots live in shared memory, and what proves them.

A job's memory tier on a node is one directory in shared memory (``/dev/shm`` or
``STASHPOINT_SHM_DIR``), named after the job's key (:func:`memory_root`)::

    stashpoint-mem-<key>/
      rank-00003/
        keeper.sock              the keeper process of rank 3 listens here
        keeper.lock              held (flock) by that keeper while it lives
        slot-0.safetensors       a snapshot slot: a whole safetensors data file
        slot-0.json              its manifest, present only while the slot holds a
                                 complete, checksummed snapshot
        slot-1.safetensors ...
      held-rank-*/, parity-*/    with protection (MemoryPolicy.protection): what this node
                                 keeps for other nodes' ranks (engine/protect_store.py)

A slot is allocated once and reused.  Before the trainer starts copying into a slot
it removes the slot's manifest, and the keeper writes a new manifest only after the
copy is over and every block's crc32c is computed: a snapshot without a manifest
does not exist, so a crash in the middle of a copy never exposes a partial one.  A
manifest is sealed with the SHA-256 of its bytes (as the index is) and lists the
step, the save id all ranks agreed on, and this rank's chunk records with their
checksums; rank 0's manifest also holds the plan the index is built from.

A complete snapshot of step S is the set of every rank's manifest for S with the
same save id.  :func:`open_view` turns one into an ordinary committed checkpoint
directory (hard links to the slot files plus an index built from the manifests),
so loading, resharding and verifying a snapshot go through the one reader and
planner of the durable tier.

Torch-free apart from what the index builder imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from stashpoint.engine.persist import build_index, data_file_name
from stashpoint.engine.records import Contribution, contribution_from_json, contribution_to_json
from stashpoint.engine.shm import shm_dir
from stashpoint.errors import ChecksumMismatchError, IncompleteCheckpointError, IndexCorruptError
from stashpoint.format.index import INDEX_FILE, Layout, NameLayout, SaveMetadata
from stashpoint.format.index_json import check_seal, parse_strict, seal
from stashpoint.planning.save_plan import ItemPlan
from stashpoint.storage.files import open_regular, regular_size

ROOT_PREFIX = "stashpoint-mem-"
MANIFEST_KIND = "stashpoint-memory-snapshot"
MANIFEST_VERSION = 1
VIEW_PREFIX = ".view-"


def job_key(durable_root: str) -> str:
    """The memory tier's name for a job: a hash of its durable root (stable across restarts)."""
    return hashlib.sha256(durable_root.encode()).hexdigest()[:16]


def memory_root(key: str, base: str | None = None) -> str:
    return os.path.join(base or shm_dir(), f"{ROOT_PREFIX}{key}")


def rank_dir(root: str, rank: int) -> str:
    return os.path.join(root, f"rank-{rank:05d}")


def slot_data(root: str, rank: int, slot: int) -> str:
    return os.path.join(rank_dir(root, rank), f"slot-{slot}.safetensors")


def slot_manifest(root: str, rank: int, slot: int) -> str:
    return os.path.join(rank_dir(root, rank), f"slot-{slot}.json")


def keeper_socket(root: str, rank: int) -> str:
    return os.path.join(rank_dir(root, rank), "keeper.sock")


#: the longest path a Unix socket address may have (Linux: 108 bytes with the terminator)
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def socket_address(path: str) -> Iterator[str]:
    """An address for the socket at ``path`` short enough to bind or connect.

    Shared-memory roots can be deep (a test's temporary directory): a longer path is
    reached through ``/proc/self/fd`` and an open descriptor of its directory.
    """
    if len(path.encode()) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def keeper_lock(root: str, rank: int) -> str:
    return os.path.join(rank_dir(root, rank), "keeper.lock")


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What one rank's slot holds: a complete snapshot of ``step`` (see the module docstring)."""

    rank: int
    slot: int
    step: int
    save_id: str
    world_size: int
    crc_block: int
    file_size: int
    records: tuple[Contribution, ...]
    #: rank 0 only: the plan and metadata the index is built from
    plan: dict[str, ItemPlan] | None = None
    metadata: SaveMetadata | None = None


def _plan_to_json(plan: dict[str, ItemPlan]) -> list[dict]:
    out = []
    for p in plan.values():
        d = dataclasses.asdict(p)
        d["shape"] = list(p.shape)
        out.append(d)
    return out


def _plan_from_json(raw: list[dict]) -> dict[str, ItemPlan]:
    out = {}
    for d in raw:
        lay = d["layout"]
        layout = None
        if lay is not None:
            names = lay["mesh_dim_names"]
            layout = Layout(
                mesh_shape=tuple(lay["mesh_shape"]),
                mesh_dim_names=None if names is None else tuple(names),
                placements=tuple(lay["placements"]),
            )
        out[d["fqn"]] = ItemPlan(
            fqn=d["fqn"],
            is_tensor=d["is_tensor"],
            scope=d["scope"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            layout=layout,
            encoding=d["encoding"],
        )
    return out


def _metadata_from_json(meta: dict) -> SaveMetadata:
    layouts = tuple(
        NameLayout(
            rank=n["rank"],
            prefix=n["prefix"],
            kind=n["kind"],
            key=n["key"],
            global_ids=tuple(n["global_ids"]),
        )
        for n in meta.get("layouts", ())
    )
    return SaveMetadata(**{**meta, "layouts": layouts})


def manifest_to_json(m: Manifest) -> str:
    doc = {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "rank": m.rank,
        "slot": m.slot,
        "step": m.step,
        "save_id": m.save_id,
        "world_size": m.world_size,
        "crc_block": m.crc_block,
        "file_size": m.file_size,
        "records": [contribution_to_json(c) for c in m.records],
        "plan": None if m.plan is None else _plan_to_json(m.plan),
        "metadata": None if m.metadata is None else dataclasses.asdict(m.metadata),
    }
    return seal(json.dumps(doc, indent=1))


def manifest_from_json(raw: bytes, where: str) -> Manifest:
    """A manifest whose seal matches; IndexCorruptError names what is wrong otherwise."""
    if not check_seal(raw, where):
        raise IndexCorruptError(f"{where}: the snapshot manifest has no checksum")
    doc = parse_strict(raw, where)
    try:
        if doc["kind"] != MANIFEST_KIND or doc["version"] != MANIFEST_VERSION:
            raise IndexCorruptError(f"{where}: not a snapshot manifest of version {MANIFEST_VERSION}")
        meta = doc["metadata"]
        return Manifest(
            rank=int(doc["rank"]),
            slot=int(doc["slot"]),
            step=int(doc["step"]),
            save_id=str(doc["save_id"]),
            world_size=int(doc["world_size"]),
            crc_block=int(doc["crc_block"]),
            file_size=int(doc["file_size"]),
            records=tuple(contribution_from_json(c) for c in doc["records"]),
            plan=None if doc["plan"] is None else _plan_from_json(doc["plan"]),
            metadata=None if meta is None else _metadata_from_json(meta),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(
            f"{where}: malformed snapshot manifest ({type(exc).__name__}: {exc})"
        ) from None


def write_manifest(root: str, m: Manifest) -> None:
    """Atomically: a reader sees the old manifest, none, or the new one, never a part."""
    final = slot_manifest(root, m.rank, m.slot)
    tmp = f"{final}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest_to_json(m))
    os.replace(tmp, final)


def drop_manifest(root: str, rank: int, slot: int) -> None:
    """The slot is about to be overwritten: it no longer holds a snapshot."""
    try:
        os.unlink(slot_manifest(root, rank, slot))
    except FileNotFoundError:
        pass


def read_manifests(root: str, rank: int) -> list[Manifest]:
    """This rank's complete snapshots on this node, newest first; damaged manifests are skipped."""
    d = rank_dir(root, rank)
    try:
        names = sorted(n for n in os.listdir(d) if n.startswith("slot-") and n.endswith(".json"))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(d, name)
        try:
            # never a FIFO or device in place of a manifest (NotAFileError is an IndexCorruptError)
            with os.fdopen(open_regular(path), "rb") as f:
                m = manifest_from_json(f.read(), path)
        except (OSError, IndexCorruptError):
            continue
        if m.rank == rank and os.path.exists(slot_data(root, rank, m.slot)):
            out.append(m)
    return sorted(out, key=lambda m: m.step, reverse=True)


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """A complete snapshot on this node: every rank's manifest for one step and save id."""

    step: int
    save_id: str
    manifests: tuple[Manifest, ...]  # by rank

    @property
    def world_size(self) -> int:
        return len(self.manifests)


def complete_snapshots(root: str) -> list[Snapshot]:
    """Snapshots every rank of which is on this node, newest first."""
    by_rank: dict[int, list[Manifest]] = {}
    try:
        ranks = [int(n[5:]) for n in os.listdir(root) if n.startswith("rank-") and n[5:].isdigit()]
    except OSError:
        return []
    for r in ranks:
        by_rank[r] = read_manifests(root, r)
    candidates: dict[tuple[int, str], dict[int, Manifest]] = {}
    for ms in by_rank.values():
        for m in ms:
            candidates.setdefault((m.step, m.save_id), {})[m.rank] = m
    out = []
    for (step, save_id), got in candidates.items():
        world = next(iter(got.values())).world_size
        if set(got) == set(range(world)) and got[0].plan is not None:
            out.append(Snapshot(step=step, save_id=save_id, manifests=tuple(got[r] for r in range(world))))
    return sorted(out, key=lambda s: s.step, reverse=True)


def snapshot_index_json(snap: Snapshot) -> str:
    """The index of ``snap`` as a checkpoint: data file ``data-<rank>`` is rank's slot."""
    first = snap.manifests[0]
    index = build_index(
        first.plan, [list(m.records) for m in snap.manifests], first.metadata, first.crc_block
    )
    return index.to_json()


def open_view(root: str, snap: Snapshot, tag: str, sources: dict[int, str] | None = None) -> str:
    """A committed checkpoint directory for ``snap``, made of hard links; remove with :func:`close_view`.

    Checks each slot file still has the size its manifest recorded (a slot being
    rewritten has lost its manifest, and a truncated one is refused here).
    ``sources``: rank -> the file holding that rank's slot, where it is not in ``root``
    (another node's root, a replica, a slot rebuilt after a node loss).
    """
    view = os.path.join(root, f"{VIEW_PREFIX}{snap.step}-{tag}")
    close_view(view)
    os.makedirs(view)
    try:
        for m in snap.manifests:
            src = (sources or {}).get(m.rank) or slot_data(root, m.rank, m.slot)
            if regular_size(src) < m.file_size:
                raise ChecksumMismatchError(
                    f"{src}: the slot is shorter than its snapshot of step {snap.step}"
                )
            os.link(src, os.path.join(view, data_file_name(m.rank)))
        with open(os.path.join(view, INDEX_FILE), "w") as f:
            f.write(snapshot_index_json(snap))
    except FileNotFoundError as exc:
        close_view(view)
        raise IncompleteCheckpointError(f"{root}: snapshot of step {snap.step} vanished: {exc}") from None
    except OSError as exc:  # no hard links on this file system, permissions: not usable
        close_view(view)
        raise IncompleteCheckpointError(f"{root}: snapshot of step {snap.step} unreadable: {exc}") from None
    except BaseException:
        close_view(view)
        raise
    return view


def close_view(view: str) -> None:
    shutil.rmtree(view, ignore_errors=True)
