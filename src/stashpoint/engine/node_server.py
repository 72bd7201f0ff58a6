"""A keeper's server for protection traffic from other nodes: its node's memory root over TCP.

When a job's nodes do not share a file system, every keeper listens on the address its
trainer names (:class:`~stashpoint.engine.messages.ServeNode`) and serves its node's
memory root to the keepers and trainers of the other nodes
(:class:`~stashpoint.engine.net_transport.SocketTransport`), one thread per connection,
speaking :mod:`~stashpoint.engine.wire`.  It applies the same file primitives as
:class:`~stashpoint.engine.transport.FileTransport` to its own root, so a protection
written over the network is byte for byte what a shared file system would hold.

What a peer may do is narrow:

* every path is relative to the root, normalised, without ``..``; it must resolve
  inside the root;
* writes (whole files, XOR into a parity, removal, the stripe lock) only under the
  directories protection owns (``held-rank-*``, ``parity-*``, ``rebuilt``), never a
  rank's own slots;
* a writing request is answered before its bytes are sent, so a refused one costs no
  traffic and leaves the connection in step;
* a lock is held by its connection: it is released when the peer closes it, or dies.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from stashpoint.engine import wire
from stashpoint.engine.parity import PIECE_BYTES
from stashpoint.engine.protect_store import HELD_PREFIX, PARITY_PREFIX, REBUILT_DIR
from stashpoint.engine.transport import FileTransport, PartFile, XorFile
from stashpoint.errors import ProtectionError, StashpointError, UnsafePathError
from stashpoint.storage.files import pread_into

#: how long the accept loop sleeps between checks that the server is still wanted
_ACCEPT_POLL_S = 0.5
#: how long a new connection has to prove the job's token
HANDSHAKE_TIMEOUT_S = 10.0


def _is_protection_dir(first: str) -> bool:
    return first.startswith((HELD_PREFIX, PARITY_PREFIX)) or first == REBUILT_DIR


class NodeServer:
    """Serves ``root`` on ``host`` (port chosen by the system) to peers holding ``token``."""

    def __init__(self, root: str, token: str, host: str, timeout_s: float) -> None:
        self.root, self.token, self.host, self.timeout_s = os.path.realpath(root), token, host, timeout_s
        self.files = FileTransport({0: self.root})
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.create_server((host, 0), family=family)
        except OSError as exc:
            raise ProtectionError(f"{root}: cannot listen for peer nodes on {host!r}: {exc}") from None
        self.sock.settimeout(_ACCEPT_POLL_S)
        port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._closed = threading.Event()
        #: connections accepted so far (a count for telemetry and tests)
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="stashpoint-node-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):  # wakes a waiting accept() at once (Linux)
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5 * _ACCEPT_POLL_S)
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(
                target=self._serve, args=(conn, f"{self.address} <- {peer[0]}"), daemon=True
            ).start()

    # ------------------------------------------------------------------ one connection

    def _serve(self, conn: socket.socket, where: str) -> None:
        with conn, contextlib.ExitStack() as held:
            conn.settimeout(min(HANDSHAKE_TIMEOUT_S, self.timeout_s))  # a stranger holds no thread long
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are small frames
            try:
                if not wire.challenge(conn, self.token, where):
                    return
                conn.settimeout(self.timeout_s)
                while not self._closed.is_set():
                    req = wire.recv_frame(conn, where)
                    if not self._answer(conn, req, held, where):
                        return
            except wire.WireError:
                return  # the peer went away, or stayed silent past the timeout

    def _answer(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> bool:
        """Carry out one request; False when the connection cannot go on."""
        try:
            op = req.get("op")
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtectionError(f"{where}: unknown request {op!r}")
            handler(self, conn, req, held, where)
            return True
        except wire.WireError:
            raise
        except Exception as exc:  # the peer is told which request failed and why, by a named error
            wire.answer_error(conn, _named(exc, req), where)
            return req.get("op") not in _STREAMING  # a stream cut short leaves the connection out of step

    def _path(self, req: dict, *, writable: bool) -> tuple[str, str]:
        """(relative path, absolute path) of a request, checked as the module docstring says."""
        rel = req["path"]
        if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
            raise UnsafePathError(f"{self.root}: {rel!r} is not a path inside the memory root")
        parts = rel.split("/")
        if ".." in parts or os.path.normpath(rel) != rel.rstrip("/"):
            raise UnsafePathError(f"{self.root}: {rel!r} is not a normalised path inside the memory root")
        if writable and not _is_protection_dir(parts[0]):
            raise UnsafePathError(
                f"{self.root}: {rel!r} is not in a protection directory; peers may not write it"
            )
        path = os.path.join(self.root, rel)
        parent = os.path.realpath(os.path.dirname(path))
        if parent != self.root and not parent.startswith(self.root + os.sep):
            raise UnsafePathError(f"{self.root}: {rel!r} resolves outside the memory root")
        return rel, path

    # ------------------------------------------------------------------ requests

    def _write(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=True)
        size = int(req["size"])
        part = PartFile(self.files.writable_path(0, rel))
        try:
            wire.send_frame(conn, {"ok": True}, where)
            wire.recv_pieces(conn, size, where, part.write_at)
            part.commit()
        finally:
            part.abort()
        wire.send_frame(conn, {"ok": True}, where)

    def _xor(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=True)
        size = int(req["size"])
        f = XorFile(self.files.writable_path(0, rel), size)
        try:
            wire.send_frame(conn, {"ok": True}, where)
            wire.recv_pieces(conn, size, where, f.xor_at)
        finally:
            f.close()
        wire.send_frame(conn, {"ok": True}, where)

    def _read(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=False)
        fd = self.files.open_read(0, rel)
        try:
            size = os.fstat(fd).st_size
            offset = max(0, int(req.get("offset", 0)))
            want = int(req.get("length", -1))
            n = max(0, size - offset) if want < 0 else max(0, min(want, size - offset))
            wire.send_frame(conn, {"ok": True, "size": n}, where)
            buf = bytearray(min(n, PIECE_BYTES))
            for a in range(0, n, PIECE_BYTES):
                piece = memoryview(buf)[: min(PIECE_BYTES, n - a)]
                if pread_into(fd, offset + a, piece) != len(piece):
                    raise wire.WireError(f"{where}: {rel} shrank while it was read")
                wire.send_payload(conn, piece, where)
        finally:
            os.close(fd)

    def _size(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=False)
        wire.send_frame(conn, {"ok": True, "size": self.files.size(0, rel)}, where)

    def _checksums(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=False)
        crcs = self.files.checksums(0, rel, int(req["block"]))
        wire.send_frame(conn, {"ok": True, "crcs": crcs}, where)

    def _list(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=False)
        wire.send_frame(conn, {"ok": True, "names": self.files.listdir(0, rel)}, where)

    def _remove(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=True)
        self.files.remove(0, rel)
        wire.send_frame(conn, {"ok": True}, where)

    def _write_text(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=True)
        self.files.write_text(0, rel, str(req["text"]))
        wire.send_frame(conn, {"ok": True}, where)

    def _lock(self, conn: socket.socket, req: dict, held: contextlib.ExitStack, where: str) -> None:
        rel, _ = self._path(req, writable=True)
        held.enter_context(self.files.lock(0, rel, float(req["timeout_s"])))
        wire.send_frame(conn, {"ok": True}, where)


def _named(exc: BaseException, req: dict) -> BaseException:
    """An error a peer can be told: stashpoint's own, or a ProtectionError naming the request."""
    if isinstance(exc, StashpointError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ProtectionError(f"{req.get('path')!r}: no such file in the memory root")
    return ProtectionError(f"{req.get('op')} {req.get('path')!r}: {type(exc).__name__}: {exc}")


#: requests whose bytes follow their first answer
_STREAMING = frozenset({"write", "xor", "read"})

_HANDLERS = {
    "write": NodeServer._write,
    "xor": NodeServer._xor,
    "read": NodeServer._read,
    "size": NodeServer._size,
    "checksums": NodeServer._checksums,
    "list": NodeServer._list,
    "remove": NodeServer._remove,
    "write_text": NodeServer._write_text,
    "lock": NodeServer._lock,
}
