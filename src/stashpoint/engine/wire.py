"""The byte protocol between keepers on different nodes (protection traffic over TCP).

A connection starts with a challenge: the server sends a magic word, the protocol
version and 16 random bytes; the client answers with the HMAC-SHA256 of those bytes
under the job's token (agreed over the job's process group at start, never sent on the
wire), and the server answers one byte, ``1``.  A client without the token is closed on.

Then the client sends requests and the server answers each in turn.  A *frame* is a
4-byte big-endian length and that many bytes of JSON (a request's ``op`` and arguments,
or an answer: ``{"ok": true, ...}``, or ``{"ok": false, "error": <class>, "message":
...}`` naming a :mod:`stashpoint.errors` class).  A request or answer that carries bytes
says how many in ``"size"`` and is followed by them in pieces of at most
:data:`~stashpoint.engine.parity.PIECE_BYTES`, each followed by its crc32c (4 bytes): a
piece damaged in transit is a :class:`~stashpoint.errors.ChecksumMismatchError` at once,
before anything is written.  Every receive has the connection's timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from collections.abc import Callable

from stashpoint import errors
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.parity import PIECE_BYTES

MAGIC = b"STASHPT1"
VERSION = 1
NONCE_BYTES = 16
#: the longest JSON frame accepted (a listing of a directory, a list of block checksums)
MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")
_CRC = struct.Struct(">I")


WireError = errors.PeerConnectionError


def _recv_exact(sock: socket.socket, out: memoryview, where: str) -> None:
    got = 0
    while got < len(out):
        try:
            n = sock.recv_into(out[got:])
        except TimeoutError:
            raise WireError(f"{where}: no answer within {sock.gettimeout():g}s") from None
        except OSError as exc:
            raise WireError(f"{where}: the connection failed: {exc}") from None
        if n == 0:
            raise WireError(f"{where}: the peer closed the connection")
        got += n


def recv_bytes(sock: socket.socket, n: int, where: str) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf), where)
    return bytes(buf)


def send_all(sock: socket.socket, data: bytes | memoryview, where: str) -> None:
    try:
        sock.sendall(data)
    except TimeoutError:
        raise WireError(f"{where}: the peer took no data for {sock.gettimeout():g}s") from None
    except OSError as exc:
        raise WireError(f"{where}: the connection failed: {exc}") from None


def send_frame(sock: socket.socket, doc: dict, where: str) -> None:
    body = json.dumps(doc).encode()
    send_all(sock, _LEN.pack(len(body)) + body, where)


def recv_frame(sock: socket.socket, where: str) -> dict:
    (n,) = _LEN.unpack(recv_bytes(sock, _LEN.size, where))
    if n > MAX_FRAME:
        raise WireError(f"{where}: a frame of {n} bytes is over the limit of {MAX_FRAME}")
    try:
        doc = json.loads(recv_bytes(sock, n, where))
    except ValueError:
        raise WireError(f"{where}: a frame is not JSON") from None
    if not isinstance(doc, dict):
        raise WireError(f"{where}: a frame is not a JSON object")
    return doc


def send_payload(
    sock: socket.socket, data: memoryview, where: str, paced: Callable[[int], None] | None = None
) -> None:
    """``data`` in pieces, each followed by its crc32c (see the module docstring)."""
    view = memoryview(data).cast("B")
    for a in range(0, len(view), PIECE_BYTES):
        piece = view[a : a + PIECE_BYTES]
        send_all(sock, piece, where)
        send_all(sock, _CRC.pack(crc32c(piece)), where)
        if paced is not None:
            paced(len(piece))


def recv_pieces(sock: socket.socket, size: int, where: str, take: Callable[[int, memoryview], None]) -> None:
    """Receive ``size`` bytes sent by :func:`send_payload`; ``take(offset, piece)`` gets each
    piece once its checksum matched."""
    buf = bytearray(min(size, PIECE_BYTES))
    for a in range(0, size, PIECE_BYTES):
        piece = memoryview(buf)[: min(PIECE_BYTES, size - a)]
        _recv_exact(sock, piece, where)
        (want,) = _CRC.unpack(recv_bytes(sock, _CRC.size, where))
        if crc32c(piece) != want:
            raise errors.ChecksumMismatchError(
                f"{where}: bytes {a}..{a + len(piece)} were damaged in transit (crc32c mismatch)"
            )
        take(a, piece)


def answer_error(sock: socket.socket, exc: BaseException, where: str) -> None:
    send_frame(sock, {"ok": False, "error": type(exc).__name__, "message": str(exc)}, where)


def raise_if_failed(doc: dict, where: str) -> dict:
    """The answer, or the named error it reports (a class of :mod:`stashpoint.errors`,
    else :class:`~stashpoint.errors.ProtectionError`)."""
    if doc.get("ok") is True:
        return doc
    cls = getattr(errors, str(doc.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.StashpointError)):
        cls = errors.ProtectionError
    raise cls(str(doc.get("message", f"{where}: the peer failed")))


# --------------------------------------------------------------------------- handshake


def _mac(token: str, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), MAGIC + nonce, hashlib.sha256).digest()


def challenge(sock: socket.socket, token: str, where: str) -> bool:
    """Server side: True when the client proved it holds the token."""
    nonce = os.urandom(NONCE_BYTES)
    send_all(sock, MAGIC + struct.pack(">H", VERSION) + nonce, where)
    proof = recv_bytes(sock, hashlib.sha256().digest_size, where)
    if not hmac.compare_digest(proof, _mac(token, nonce)):
        return False
    send_all(sock, b"\x01", where)
    return True


def answer_challenge(sock: socket.socket, token: str, where: str) -> None:
    """Client side: prove the token; WireError when the server is not a keeper of this job."""
    hello = recv_bytes(sock, len(MAGIC) + 2 + NONCE_BYTES, where)
    if hello[: len(MAGIC)] != MAGIC:
        raise WireError(f"{where}: not a stashpoint keeper")
    (version,) = struct.unpack(">H", hello[len(MAGIC) : len(MAGIC) + 2])
    if version != VERSION:
        raise WireError(f"{where}: the keeper speaks protocol {version}, this process {VERSION}")
    send_all(sock, _mac(token, hello[len(MAGIC) + 2 :]), where)
    if recv_bytes(sock, 1, where) != b"\x01":
        raise WireError(f"{where}: the keeper refused this job's token")
