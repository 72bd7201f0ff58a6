"""A torchft ``CheckpointTransport`` that heals a replica group from stashpoint checkpoints.

When a replica group falls behind, torchft asks a healthy one to send its state
(``send_checkpoint``) and the recovering one to fetch it (``recv_checkpoint``).
:class:`StashpointTransport` offers the state as a stashpoint checkpoint over HTTP:

* if the node's memory tier (``CheckpointManager(..., memory=MemoryPolicy(...))``,
  ``mgr.memory_root``) holds a complete snapshot of the step being sent, and that
  snapshot holds every tensor of the state (same name, dtype and shape), its slot
  files are served as they are (hard links, no extra copy of any tensor);
* otherwise the given state dict's tensors are saved once into a checkpoint in shared
  memory, which is served and removed by ``disallow_checkpoint``.

The recovering side reads the manifest (the state's structure and plain values, as
JSON), then only the byte ranges of the tensors it needs, each block checked against
its crc32c, and returns the state dict bit-exact.  Nothing is pickled: a value JSON
cannot hold is refused with :class:`~stashpoint.errors.InvalidStateError`.

Tensor names: a tensor at keys ``("user", "default", "model", "w")`` of torchft's state
is named ``user.default.model.w``; the snapshot is searched for that name with
``snapshot_prefix`` removed (torchft's ``Manager`` puts the user's state under
``user.<key>``; the default prefix fits ``state_dict=`` given to the ``Manager``).
Requires ``stashpoint[torchft]``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
from torchft.checkpointing.transport import CheckpointTransport

import stashpoint
from stashpoint._dist import solo_group
from stashpoint.engine.memtier import close_view, complete_snapshots, open_view
from stashpoint.engine.reader import CheckpointReader
from stashpoint.engine.shm import shm_dir
from stashpoint.errors import PeerTransferError
from stashpoint.format.dtypes import dtype_name
from stashpoint.format.index import INDEX_FILE, TensorRecord
from stashpoint.format.values import from_json, to_json
from stashpoint.integrations.peer_http import CKPT, PeerServer, PeerStorage, Published
from stashpoint.integrations.tree import SplitTree, join_tree, split_tree
from stashpoint.storage.local import LocalStorage

MANIFEST_KIND = "stashpoint-torchft-state"
#: where torchft's Manager puts the state given as ``state_dict=`` (key "default")
DEFAULT_PREFIX = "user.default."


def _seconds(timeout: timedelta | float) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _covers(index_items: dict, split: SplitTree, prefix: str) -> dict[str, str] | None:
    """Tensor name -> snapshot item name, when the snapshot holds every tensor alike; else None."""
    names = {}
    for name, t in split.tensors.items():
        item = name[len(prefix) :] if name.startswith(prefix) else name
        rec = index_items.get(item)
        if not isinstance(rec, TensorRecord):
            return None
        if rec.dtype != dtype_name(t.dtype) or rec.shape != tuple(t.shape):
            return None
        names[name] = item
    return names


class StashpointTransport(CheckpointTransport[dict]):
    """Serve this replica's state to recovering peers, and fetch a peer's when recovering.

    ``memory_root``: the node's memory tier (``CheckpointManager.memory_root``), or None
    to always copy the state; ``timeout``: every wait (a request for a step not yet sent,
    requests in flight at ``disallow_checkpoint``, the server's threads at ``shutdown``).
    """

    def __init__(
        self,
        *,
        memory_root: str | None = None,
        timeout: timedelta | float = timedelta(seconds=60),
        snapshot_prefix: str = DEFAULT_PREFIX,
        host: str = "",
    ) -> None:
        self.memory_root = memory_root
        self.snapshot_prefix = snapshot_prefix
        self._server = PeerServer(timeout_s=_seconds(timeout), host=host)
        self._removable: str | None = None  # the view or copy now served
        #: how the last sent step was offered: "snapshot" or "copy" (None before the first)
        self.last_source: str | None = None

    def metadata(self) -> str:
        return self._server.address

    # -- the healthy side --------------------------------------------------------------------

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: dict, timeout: timedelta) -> None:
        where = f"{self.metadata()}/step/{step}"
        split = split_tree(state_dict, where)
        self.disallow_checkpoint()
        directory, names, removable = self._from_snapshot(step, split) or self._copy(step, split)
        self._removable = removable
        doc = {
            "kind": MANIFEST_KIND,
            "step": step,
            "source": self.last_source,
            "structure": to_json(split.structure),
            "tensors": {name: {"keys": to_json(split.paths[name]), "item": names[name]} for name in names},
        }
        files = frozenset([INDEX_FILE, *os.listdir(directory)])
        self._server.publish(
            Published(step=step, directory=directory, files=files, manifest=json.dumps(doc).encode())
        )

    def _from_snapshot(self, step: int, split: SplitTree) -> tuple[str, dict[str, str], str] | None:
        if self.memory_root is None:
            return None
        for snap in complete_snapshots(self.memory_root):
            if snap.step != step:
                continue
            view = open_view(self.memory_root, snap, f"torchft-{os.getpid()}")
            names = _covers(CheckpointReader(LocalStorage(), view).index.items, split, self.snapshot_prefix)
            if names is not None:
                self.last_source = "snapshot"
                return view, names, view
            close_view(view)
        return None

    def _copy(self, step: int, split: SplitTree) -> tuple[str, dict[str, str], str]:
        parent = tempfile.mkdtemp(prefix="stashpoint-torchft-", dir=shm_dir())
        path = os.path.join(parent, CKPT)
        tensors = {name: t.detach() for name, t in split.tensors.items()}
        try:
            # only this rank saves: not a collective of the job's world
            stashpoint.save(tensors, path, step=step, process_group=solo_group())
        except BaseException:
            close_view(parent)
            raise
        self.last_source = "copy"
        return path, {name: name for name in tensors}, parent

    def disallow_checkpoint(self) -> None:
        self._server.withdraw()
        if self._removable is not None:
            close_view(self._removable)  # a view of a snapshot, or the directory of a copy
            self._removable = None

    def shutdown(self, wait: bool = True) -> None:
        self._server.close(wait)
        if wait:
            self.disallow_checkpoint()

    # -- the recovering side -----------------------------------------------------------------

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> dict:
        storage = PeerStorage(metadata, step, timeout_s=_seconds(timeout))
        manifest = _parse_manifest(storage.read_document("manifest"), storage.describe("manifest"), step)
        reader = CheckpointReader(storage, CKPT, verify=True)
        names = sorted(set(manifest.items.values()))
        values = dict(reader.items(names, per_rank="drop", allow_pickle=False))
        tensors = {name: _own(values[item], reader.where, item) for name, item in manifest.items.items()}
        return join_tree(manifest.structure, manifest.paths, tensors)


def _own(value: object, where: str, item: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PeerTransferError(f"{where}: item {item!r} is a {type(value).__name__}, not a tensor")
    return value


@dataclass(frozen=True, kw_only=True)
class _Manifest:
    structure: object  # the state with None where each tensor was
    paths: dict[str, list]  # tensor name -> its keys
    items: dict[str, str]  # tensor name -> the item of the served checkpoint holding it


def _parse_manifest(raw: bytes, where: str, step: int) -> _Manifest:
    try:
        doc = json.loads(raw)
        if doc["kind"] == MANIFEST_KIND and doc["step"] == step:
            tensors = doc["tensors"]
            return _Manifest(
                structure=from_json(doc["structure"], where),
                paths={name: from_json(t["keys"], where) for name, t in tensors.items()},
                items={name: str(t["item"]) for name, t in tensors.items()},
            )
    except (ValueError, KeyError, TypeError, AttributeError):  # MalformedValue is a ValueError
        pass
    raise PeerTransferError(f"{where}: not a stashpoint torchft manifest of step {step}")


__all__ = ["DEFAULT_PREFIX", "StashpointTransport"]
