"""A memory snapshot read where its slot files lie, on any node: a read-only storage backend.

After a node loss, the slot files of one snapshot are spread over the surviving nodes:
slots still held by their own nodes, replicas, slots rebuilt from parity.  When the
nodes share no file system, :func:`open_node_view` presents them as one committed
checkpoint (``stashpoint-node-view://<id>``): its index is the snapshot's, built in
memory, and each data file is read through the
:class:`~stashpoint.engine.transport.NodeTransport` from the node that holds it.  The
loader reads from it like from any storage, so each rank fetches only the byte ranges
its targets overlap, and verifies their checksums as always; no slot file is copied
whole to another node.

A view lives in this process only, until :func:`close_node_view`.
"""

from __future__ import annotations

import itertools
import threading

from stashpoint.engine import memtier
from stashpoint.engine.persist import data_file_name
from stashpoint.engine.transport import NodeTransport
from stashpoint.errors import ChecksumMismatchError, ProtectionError
from stashpoint.format.index import INDEX_FILE
from stashpoint.storage import register_backend
from stashpoint.storage.base import ObjectWriter, Storage

SCHEME = "stashpoint-node-view"
_ROOT = "/snapshot"
_VIEWS: dict[str, NodeViewStorage] = {}
_LOCK = threading.Lock()
_IDS = itertools.count()


class NodeViewStorage(Storage):
    """One snapshot's index (in memory) and data files (``name -> (node, path)``), read-only."""

    def __init__(self, transport: NodeTransport, files: dict[str, tuple[int, str]], index_json: str) -> None:
        self.transport, self.files, self.index = transport, dict(files), index_json.encode()

    def _name(self, path: str) -> str:
        head, _, name = path.rpartition("/")
        if head != _ROOT or (name != INDEX_FILE and name not in self.files):
            raise FileNotFoundError(f"{SCHEME}:{path}")
        return name

    def describe(self, path: str) -> str:
        name = path.rpartition("/")[2]
        if name in self.files:
            return self.transport.describe(*self.files[name])
        return f"{SCHEME}:{path}"

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        name = self._name(path)
        if name == INDEX_FILE:
            piece = self.index[offset : offset + len(out)]
            memoryview(out).cast("B")[: len(piece)] = piece
            return len(piece)
        node, rel = self.files[name]
        return self.transport.read_into(node, rel, offset, out)

    def size(self, path: str) -> int:
        name = self._name(path)
        return len(self.index) if name == INDEX_FILE else self.transport.size(*self.files[name])

    def exists(self, path: str) -> bool:
        try:
            self._name(path)
        except FileNotFoundError:
            return path.rstrip("/") == _ROOT
        return True

    def is_prefix(self, path: str) -> bool:
        return path.rstrip("/") == _ROOT

    def list(self, prefix: str) -> list[str]:
        return sorted([INDEX_FILE, *self.files]) if self.is_prefix(prefix) else []

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        raise ProtectionError(f"{SCHEME}:{path}: a view of a memory snapshot is read-only")

    def delete(self, path: str) -> None:
        raise ProtectionError(f"{SCHEME}:{path}: a view of a memory snapshot is read-only")


def open_node_view(
    transport: NodeTransport, snap: memtier.Snapshot, sources: dict[int, tuple[int, str]]
) -> str:
    """The URL of a view of ``snap`` whose rank ``r`` lies at ``sources[r]`` (node, path).

    Checks that each slot file still has the size its manifest recorded, as
    :func:`~stashpoint.engine.memtier.open_view` does.
    """
    files = {}
    for m in snap.manifests:
        node, rel = sources[m.rank]
        if transport.size(node, rel) < m.file_size:
            raise ChecksumMismatchError(
                f"{transport.describe(node, rel)}: the slot is shorter than its snapshot of step {snap.step}"
            )
        files[data_file_name(m.rank)] = (node, rel)
    view = NodeViewStorage(transport, files, memtier.snapshot_index_json(snap))
    with _LOCK:
        name = f"v{next(_IDS)}"
        _VIEWS[name] = view
    return f"{SCHEME}://{name}"


def close_node_view(url: str) -> None:
    with _LOCK:
        _VIEWS.pop(url.removeprefix(f"{SCHEME}://"), None)


def _resolve(url: str) -> tuple[Storage, str]:
    with _LOCK:
        view = _VIEWS.get(url.removeprefix(f"{SCHEME}://"))
    if view is None:
        raise ProtectionError(f"{url}: no such view of a memory snapshot in this process")
    return view, _ROOT


register_backend(SCHEME, _resolve)
