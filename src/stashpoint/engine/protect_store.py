"""Where protection lives in a node's memory root, how it is proven, and how it is reached.

A node's memory root (:mod:`~stashpoint.engine.memtier`) also holds what the node keeps
for other nodes::

    stashpoint-mem-<key>/
      held-rank-00003/               replicas of rank 3's snapshots (rank 3 is elsewhere)
        s000000012-<id>.safetensors    a copy of rank 3's slot file of step 12
        s000000012-<id>.protect.json   its protection record: present only once complete
      parity-g00000-s00001/          the parity of stripe 1 of node group 0
        s000000012-<id>.parity         XOR of the stripe's slot files of step 12
        s000000012-<id>.rank-00002.member.json   one per member, as each contributes
        s000000012-<id>.protect.json   present only once every member contributed
        .lock                          taken (flock) while a member contributes
      rebuilt/                       lost ranks' slot files rebuilt from parity (recovery)

``<id>`` is a hash of the snapshot's save id.  A protection record is sealed with the
SHA-256 of its bytes (as manifests are) and lists, per member, the member's own sealed
slot manifest, the crc32c of every block of its whole slot file (header included) and
when it was sealed; and the crc32c of every block of the stored file (replica or
parity) and when the protection completed: ``protected_at - sealed_at`` is the
protection lag.  Nothing without a record is protection.

:class:`NodeTransport` is how a keeper reaches another node's root.  The one given,
:class:`FileTransport`, uses the file system: right on one machine (nodes simulated by
separate roots) or with roots on a file system every node mounts; a transport over
sockets between keepers implements the same few methods.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from stashpoint.engine.checksum import CRC_THREADS, PARALLEL_MIN_BYTES, block_crcs, spans, worker_pool
from stashpoint.engine.parity import PIECE_BYTES, Pacer, xor_into
from stashpoint.errors import ChecksumMismatchError, IndexCorruptError, ProtectionError
from stashpoint.format.index_json import check_seal, parse_strict, seal
from stashpoint.storage.files import open_regular
from stashpoint.vocab import HoldingKind

RECORD_KIND = "stashpoint-snapshot-protection"
RECORD_VERSION = 1
HELD_PREFIX = "held-rank-"
PARITY_PREFIX = "parity-"
REBUILT_DIR = "rebuilt"
RECORD_SUFFIX = ".protect.json"


def entry_name(step: int, save_id: str) -> str:
    return f"s{step:09d}-{hashlib.sha256(save_id.encode()).hexdigest()[:12]}"


def entry_step(name: str) -> int | None:
    """The step of an entry's file name (None: not an entry)."""
    head = name[1:10]
    return int(head) if name.startswith("s") and head.isdigit() and name[10:11] == "-" else None


def held_dir(rank: int) -> str:
    return f"{HELD_PREFIX}{rank:05d}"


def parity_dir(stripe: str) -> str:
    return f"{PARITY_PREFIX}{stripe}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class Member:
    """One rank's slot file as it was protected."""

    rank: int
    file_size: int
    crc32c: tuple[int, ...]  # every block of the whole slot file
    manifest: str  # the rank's sealed slot manifest
    sealed_at: float  # unix time


@dataclass(frozen=True, kw_only=True)
class ProtectionRecord:
    """A complete replica or parity (see the module docstring)."""

    scheme: HoldingKind  # "replica" or "parity"
    step: int
    save_id: str
    world_size: int
    crc_block: int
    members: tuple[Member, ...]
    size: int  # of the stored file
    crc32c: tuple[int, ...]  # of the stored file
    protected_at: float

    @property
    def lag_s(self) -> float:
        """From the last member's seal to the protection being complete."""
        return self.protected_at - max(m.sealed_at for m in self.members)


def member_to_json(m: Member) -> str:
    doc = {
        "rank": m.rank,
        "file_size": m.file_size,
        "crc32c": list(m.crc32c),
        "manifest": m.manifest,
        "sealed_at": m.sealed_at,
    }
    return seal(json.dumps(doc, indent=1))


def _member(doc: dict) -> Member:
    return Member(
        rank=int(doc["rank"]),
        file_size=int(doc["file_size"]),
        crc32c=tuple(int(c) for c in doc["crc32c"]),
        manifest=str(doc["manifest"]),
        sealed_at=float(doc["sealed_at"]),
    )


def _sealed_doc(raw: bytes, where: str) -> dict:
    if not check_seal(raw, where):
        raise IndexCorruptError(f"{where}: the protection record has no checksum")
    doc = parse_strict(raw, where)
    if not isinstance(doc, dict):
        raise IndexCorruptError(f"{where}: not a protection record")
    return doc


def member_from_json(raw: bytes, where: str) -> Member:
    try:
        return _member(_sealed_doc(raw, where))
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{where}: malformed member record ({type(exc).__name__}: {exc})") from None


def record_to_json(r: ProtectionRecord) -> str:
    doc = {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "scheme": r.scheme,
        "step": r.step,
        "save_id": r.save_id,
        "world_size": r.world_size,
        "crc_block": r.crc_block,
        "members": [json.loads(member_to_json(m)) for m in r.members],
        "size": r.size,
        "crc32c": list(r.crc32c),
        "protected_at": r.protected_at,
        "lag_s": r.lag_s,
    }
    return seal(json.dumps(doc, indent=1))


def record_from_json(raw: bytes, where: str) -> ProtectionRecord:
    """A record whose seal matches; IndexCorruptError names what is wrong otherwise."""
    doc = _sealed_doc(raw, where)
    try:
        if doc["kind"] != RECORD_KIND or doc["version"] != RECORD_VERSION:
            raise IndexCorruptError(f"{where}: not a protection record of version {RECORD_VERSION}")
        return ProtectionRecord(
            scheme=doc["scheme"],
            step=int(doc["step"]),
            save_id=str(doc["save_id"]),
            world_size=int(doc["world_size"]),
            crc_block=int(doc["crc_block"]),
            members=tuple(_member(m) for m in doc["members"]),
            size=int(doc["size"]),
            crc32c=tuple(int(c) for c in doc["crc32c"]),
            protected_at=float(doc["protected_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(
            f"{where}: malformed protection record ({type(exc).__name__}: {exc})"
        ) from None


def check_blocks(got: list[int] | tuple[int, ...], want: tuple[int, ...], where: str, block: int) -> None:
    """ChecksumMismatchError naming the first damaged block, if any."""
    if tuple(got) == tuple(want):
        return
    bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise ChecksumMismatchError(
        f"{where}: block {bad} (bytes {bad * block}..{(bad + 1) * block}) does not match its "
        "protection checksum (damaged in memory)"
    )


def file_crcs(fd: int, size: int, block: int) -> list[int]:
    """The crc32c of every ``block`` bytes of an open file, read in pieces (on the pool's
    threads for a large file).  Reads, not a mapping: a file shortened meanwhile reads
    short and fails its checksums instead of faulting the process."""
    if size == 0:
        return block_crcs(memoryview(b""), block)
    step = block * max(1, PIECE_BYTES // block)

    def span(s: tuple[int, int]) -> list[int]:
        out: list[int] = []
        for a in range(s[0], s[1], step):
            out += block_crcs(memoryview(os.pread(fd, min(step, s[1] - a), a)), block)
        return out

    if size < PARALLEL_MIN_BYTES:
        return span((0, size))
    return [c for part in worker_pool().map(span, spans(size, block, CRC_THREADS)) for c in part]


# --------------------------------------------------------------------------- transport


def _open_own(path: str, flags: int) -> int:
    """Open (creating) a file of the memory root, never through a symbolic link."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        why = f"{exc.strerror}; a link or a special file?"
        raise ProtectionError(f"{path}: cannot be written ({why})") from None


class NodeTransport:
    """How protection reaches the memory root of node ``node`` (paths relative to it)."""

    def write(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        raise NotImplementedError

    def write_text(self, node: int, relpath: str, text: str) -> None:
        raise NotImplementedError

    def read(self, node: int, relpath: str) -> bytes:
        raise NotImplementedError

    def xor_into(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        """XOR ``data`` into the file (created, or grown with zeros, to at least its length)."""
        raise NotImplementedError

    def checksums(self, node: int, relpath: str, block: int) -> list[int]:
        raise NotImplementedError

    def lock(self, node: int, reldir: str, timeout_s: float) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def listdir(self, node: int, reldir: str) -> list[str]:
        raise NotImplementedError

    def remove(self, node: int, relpath: str) -> None:
        raise NotImplementedError

    def local_path(self, node: int, relpath: str) -> str:
        """A path on this machine where the file can be read (a network transport fetches it)."""
        raise NotImplementedError


class FileTransport(NodeTransport):
    """Every node's memory root is a directory this process can reach (see the module docstring)."""

    def __init__(self, roots: dict[int, str]) -> None:
        self.roots = dict(roots)

    def local_path(self, node: int, relpath: str) -> str:
        try:
            return os.path.join(self.roots[node], relpath)
        except KeyError:
            raise ProtectionError(f"node {node}: no memory root known for it") from None

    def _dir_for(self, node: int, relpath: str) -> str:
        path = self.local_path(node, relpath)
        if not os.path.isdir(self.roots[node]):  # never recreate the memory of a node that is gone
            raise ProtectionError(f"{self.roots[node]}: the memory root of node {node} is gone")
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ProtectionError(f"{path}: the memory root of node {node} is not reachable: {exc}") from None
        return path

    def write(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        path = self._dir_for(node, relpath)
        tmp = f"{path}.part"
        with os.fdopen(_open_own(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            for a in range(0, len(data), PIECE_BYTES):
                piece = data[a : a + PIECE_BYTES]
                f.write(piece)
                if pacer is not None:
                    pacer.took(len(piece))
        os.replace(tmp, path)

    def write_text(self, node: int, relpath: str, text: str) -> None:
        path = self._dir_for(node, relpath)
        with open(f"{path}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)

    def read(self, node: int, relpath: str) -> bytes:
        with os.fdopen(open_regular(self.local_path(node, relpath)), "rb") as f:
            return f.read()

    def xor_into(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        path = self._dir_for(node, relpath)
        fd = _open_own(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < len(data):
                os.ftruncate(fd, len(data))
            for a in range(0, len(data), PIECE_BYTES):
                piece = data[a : a + PIECE_BYTES]
                cur = bytearray(os.pread(fd, len(piece), a))
                xor_into(memoryview(cur), piece, pacer)
                os.pwrite(fd, cur, a)
        finally:
            os.close(fd)

    def checksums(self, node: int, relpath: str, block: int) -> list[int]:
        fd = open_regular(self.local_path(node, relpath))
        try:
            return file_crcs(fd, os.fstat(fd).st_size, block)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, node: int, reldir: str, timeout_s: float) -> Iterator[None]:
        path = self._dir_for(node, os.path.join(reldir, ".lock"))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ProtectionError(f"{path}: not locked within {timeout_s:g}s") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)

    def listdir(self, node: int, reldir: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.local_path(node, reldir)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def remove(self, node: int, relpath: str) -> None:
        path = self.local_path(node, relpath)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
