"""Protection traffic over TCP: :class:`SocketTransport`, and the choice of a transport.

A :class:`TransportSpec` is what every rank agreed on at the start
(:func:`~stashpoint.manager.node_loss.start_protection`): the transport kind, each node's
memory root, the addresses its keepers listen on (:mod:`~stashpoint.engine.node_server`)
and the job's token.  :func:`make_transport` turns it into the transport one process
uses: a node whose root this process can reach (its own) is reached through the file
system, every other node through the first of its keepers that answers.

A request that changes something (a write, an XOR, a removal) opens its own connection,
so a failed one never leaves a half-done stream behind and is never sent twice.  Reads,
listings and checksums reuse idle connections (a resharded load makes many small
reads), and go once more over a new connection when a kept one was closed meanwhile.  A
stripe's lock holds its connection open until released.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stashpoint.engine import wire
from stashpoint.engine.parity import Pacer
from stashpoint.engine.transport import FileTransport, NodeTransport
from stashpoint.errors import PeerConnectionError, ProtectionError
from stashpoint.vocab import PeerTransport

#: the longest a connection attempt to one address may take
CONNECT_TIMEOUT_S = 10.0
#: a kept connection idle longer than this is closed rather than used again
KEEP_IDLE_S = 20.0
#: requests that change nothing: they may go over a kept connection (and be sent again)
_IDEMPOTENT = frozenset({"read", "size", "checksums", "list"})


@dataclass(frozen=True, kw_only=True)
class TransportSpec:
    """How this job's nodes reach each other's memory roots (the same on every rank)."""

    kind: PeerTransport  # "files" or "sockets" once agreed
    roots: tuple[tuple[int, str], ...]  # node -> memory root
    addresses: tuple[tuple[int, tuple[str, ...]], ...] = ()  # node -> its keepers' "host:port"
    token: str = ""
    timeout_s: float = 600.0


def make_transport(spec: TransportSpec, node: int | None) -> NodeTransport:
    """The transport for a process on ``node`` (None: a process on no node of the job)."""
    if spec.kind == "files":
        return FileTransport(dict(spec.roots))
    local = {n: r for n, r in spec.roots if n == node}
    return SocketTransport(dict(spec.addresses), spec.token, spec.timeout_s, local=local)


def default_listen_host() -> str:
    """Where this host's keepers listen for the other nodes: the address of its interface
    toward the job's rendezvous host (``MASTER_ADDR``, as torchrun sets it; nothing is
    sent to find it), else the host's name."""
    master = os.environ.get("MASTER_ADDR", "")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master, 9))
                return probe.getsockname()[0]
        except OSError:
            pass
    return socket.gethostname()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-host]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ProtectionError(f"{address!r} is not a host:port address")
    return host.strip("[]"), int(port)


def _copy_into(view: memoryview) -> Callable[[int, memoryview], None]:
    def take(offset: int, piece: memoryview) -> None:
        view[offset : offset + len(piece)] = piece

    return take


class SocketTransport(NodeTransport):
    """Other nodes' memory roots through their keepers; ``local`` nodes through the file system."""

    def __init__(
        self,
        addresses: dict[int, tuple[str, ...]],
        token: str,
        timeout_s: float,
        *,
        local: dict[int, str] | None = None,
    ) -> None:
        self.addresses, self.token, self.timeout_s = dict(addresses), token, timeout_s
        self.files = FileTransport(local or {})
        self._idle: dict[int, list[tuple[float, socket.socket, str]]] = {}
        self._idle_lock = threading.Lock()

    def _local(self, node: int) -> bool:
        return node in self.files.roots

    def describe(self, node: int, relpath: str) -> str:
        if self._local(node):
            return self.files.describe(node, relpath)
        first = (self.addresses.get(node) or ("?",))[0]
        return f"node {node} ({first}):{relpath}"

    def local_file(self, node: int, relpath: str) -> str:
        if not self._local(node):
            raise ProtectionError(f"{self.describe(node, relpath)}: node {node} is reached over the network")
        return self.files.writable_path(node, relpath)

    def _open(self, node: int, address: str) -> socket.socket:
        where = f"node {node} ({address})"
        try:
            sock = socket.create_connection(
                split_address(address), timeout=min(CONNECT_TIMEOUT_S, self.timeout_s)
            )
        except OSError as exc:
            raise PeerConnectionError(f"{where}: cannot connect: {exc.strerror or exc}") from None
        try:
            sock.settimeout(self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire.answer_challenge(sock, self.token, where)
        except BaseException:
            sock.close()
            raise
        return sock

    def _dial(self, node: int) -> tuple[socket.socket, str]:
        """A new connection to the first keeper of ``node`` that answers and proves this job's token."""
        tried = []
        for address in self.addresses.get(node, ()):
            try:
                return self._open(node, address), f"node {node} ({address})"
            except PeerConnectionError as exc:
                tried.append(str(exc))
        raise PeerConnectionError(
            f"node {node}: no keeper answers ({'; '.join(tried) or 'no address known'})"
        )

    def _kept(self, node: int) -> tuple[socket.socket, str] | None:
        """An idle connection to ``node`` kept from an earlier request, if a fresh one is left."""
        now = time.monotonic()
        with self._idle_lock:
            idle = self._idle.get(node, [])
            while idle:
                since, sock, where = idle.pop()
                if now - since < KEEP_IDLE_S:
                    return sock, where
                sock.close()
        return None

    def _exchange(self, sock: socket.socket, where: str, req: dict, payload, pacer, receive) -> dict:
        where = f"{where}:{req.get('path')}"
        wire.send_frame(sock, req, where)
        answer = wire.raise_if_failed(wire.recv_frame(sock, where), where)
        if payload is not None:
            wire.send_payload(sock, payload, where, None if pacer is None else pacer.took)
            answer = wire.raise_if_failed(wire.recv_frame(sock, where), where)
        if receive is not None:
            receive(sock, where, answer)
        return answer

    def _call(
        self,
        node: int,
        req: dict,
        payload: memoryview | None = None,
        pacer: Pacer | None = None,
        receive: Callable[[socket.socket, str, dict], None] | None = None,
    ) -> dict:
        """One request: its answer, then its bytes (sent, or handed to ``receive``).

        A request that changes nothing goes over a kept connection when there is one, and
        again over a new one if the kept one turns out closed; the connection is kept for
        the next such request once this one succeeded.  Any other request, and any failed
        one, has a connection of its own, closed after it.
        """
        reuse = req["op"] in _IDEMPOTENT
        kept = self._kept(node) if reuse else None
        if kept is not None:
            try:
                answer = self._exchange(*kept, req, payload, pacer, receive)
            except PeerConnectionError:
                kept[0].close()  # closed by the keeper meanwhile: once more on a new connection
            except BaseException:
                kept[0].close()
                raise
            else:
                self._keep(node, *kept)
                return answer
        sock, where = self._dial(node)
        try:
            answer = self._exchange(sock, where, req, payload, pacer, receive)
        except BaseException:
            sock.close()
            raise
        if reuse:
            self._keep(node, sock, where)
        else:
            sock.close()
        return answer

    def _keep(self, node: int, sock: socket.socket, where: str) -> None:
        with self._idle_lock:
            self._idle.setdefault(node, []).append((time.monotonic(), sock, where))

    def close(self) -> None:
        with self._idle_lock:
            for idle in self._idle.values():
                for _since, sock, _where in idle:
                    sock.close()
            self._idle.clear()

    # ------------------------------------------------------------------ the interface

    def write(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        if self._local(node):
            return self.files.write(node, relpath, data, pacer)
        self._call(
            node, {"op": "write", "path": relpath, "size": len(data)}, memoryview(data).cast("B"), pacer
        )

    def write_text(self, node: int, relpath: str, text: str) -> None:
        if self._local(node):
            return self.files.write_text(node, relpath, text)
        self._call(node, {"op": "write_text", "path": relpath, "text": text})

    def xor_into(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        if self._local(node):
            return self.files.xor_into(node, relpath, data, pacer)
        self._call(node, {"op": "xor", "path": relpath, "size": len(data)}, memoryview(data).cast("B"), pacer)

    def read_into(self, node: int, relpath: str, offset: int, out: memoryview) -> int:
        if self._local(node):
            return self.files.read_into(node, relpath, offset, out)
        view = memoryview(out).cast("B")

        def receive(sock: socket.socket, where: str, answer: dict) -> None:
            wire.recv_pieces(sock, int(answer["size"]), where, _copy_into(view))

        req = {"op": "read", "path": relpath, "offset": offset, "length": len(view)}
        return int(self._call(node, req, receive=receive)["size"])

    def read(self, node: int, relpath: str) -> bytes:
        if self._local(node):
            return self.files.read(node, relpath)
        out = bytearray()

        def receive(sock: socket.socket, where: str, answer: dict) -> None:
            out.extend(bytes(int(answer["size"])))
            view = memoryview(out)
            wire.recv_pieces(sock, len(out), where, _copy_into(view))

        self._call(node, {"op": "read", "path": relpath, "offset": 0, "length": -1}, receive=receive)
        return bytes(out)

    def size(self, node: int, relpath: str) -> int:
        if self._local(node):
            return self.files.size(node, relpath)
        return int(self._call(node, {"op": "size", "path": relpath})["size"])

    def checksums(self, node: int, relpath: str, block: int) -> list[int]:
        if self._local(node):
            return self.files.checksums(node, relpath, block)
        return [
            int(c) for c in self._call(node, {"op": "checksums", "path": relpath, "block": block})["crcs"]
        ]

    def listdir(self, node: int, reldir: str) -> list[str]:
        if self._local(node):
            return self.files.listdir(node, reldir)
        return [str(n) for n in self._call(node, {"op": "list", "path": reldir})["names"]]

    def remove(self, node: int, relpath: str) -> None:
        if self._local(node):
            return self.files.remove(node, relpath)
        self._call(node, {"op": "remove", "path": relpath})

    @contextlib.contextmanager
    def lock(self, node: int, reldir: str, timeout_s: float) -> Iterator[None]:
        if self._local(node):
            with self.files.lock(node, reldir, timeout_s):
                yield
            return
        sock, where = self._dial(node)
        with sock:
            sock.settimeout(timeout_s + self.timeout_s)
            wire.send_frame(sock, {"op": "lock", "path": reldir, "timeout_s": timeout_s}, where)
            wire.raise_if_failed(wire.recv_frame(sock, where), where)
            sock.settimeout(self.timeout_s)
            yield  # the keeper holds the lock while this connection is open
