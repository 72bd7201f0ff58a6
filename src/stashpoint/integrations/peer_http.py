"""Checkpoint files served to a peer over HTTP, and read back through the one reader.

A healthy process publishes one committed checkpoint directory for one step
(:class:`PeerServer`); a recovering process reads it with :class:`PeerStorage`, a
read-only :class:`~stashpoint.storage.base.Storage` whose reads are HTTP range
requests, so :class:`~stashpoint.engine.reader.CheckpointReader` fetches only the byte
ranges of the items asked for and checks each block's crc32c as it does on disk.

The server speaks three kinds of URL, each under ``/step/<step>/``:

* ``manifest``: a JSON document the publisher provides (what the checkpoint holds);
* ``ckpt/<name>``: a file of the published checkpoint (``GET`` with ``Range``, ``HEAD``).

A request for a step that is not published waits (up to the server's timeout) for it
to be; the answer is then 503, which the reader turns into :class:`PeerTimeoutError`.
Torch-free; the standard library's ``http.server`` in one daemon thread.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from stashpoint.errors import PeerTimeoutError, PeerTransferError, UnsupportedStorageError
from stashpoint.storage.base import ObjectWriter, Storage

#: the prefix, inside a step's URL, of the published checkpoint's files
CKPT = "ckpt"
_PATH = re.compile(r"^/step/(-?\d+)/(manifest|ckpt/([A-Za-z0-9_.-]+))$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Published:
    """One step's checkpoint on offer: its directory, its files and the manifest document."""

    step: int
    directory: str
    files: frozenset[str]
    manifest: bytes


class PeerServer:
    """Serves at most one :class:`Published` checkpoint at a time, on an ephemeral port."""

    def __init__(self, *, timeout_s: float, host: str = "") -> None:
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._published: Published | None = None
        self._active = 0
        self._httpd = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="stashpoint-peer", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"http://{socket.gethostname()}:{self._httpd.server_address[1]}"

    def publish(self, published: Published) -> None:
        with self._cond:
            self._published = published
            self._cond.notify_all()

    def withdraw(self) -> Published | None:
        """Stop offering; wait (up to the timeout) for requests in flight, then return what was offered."""
        with self._cond:
            old, self._published = self._published, None
            if not self._cond.wait_for(lambda: self._active == 0, timeout=self.timeout_s):
                raise PeerTimeoutError(
                    f"{self.address}: {self._active} requests for step "
                    f"{None if old is None else old.step} still running after {self.timeout_s:.0f}s"
                )
        return old

    def acquire(self, step: int) -> Published | None:
        """The checkpoint of ``step``, waiting up to the timeout for it; counted as in flight."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._published is not None and self._published.step == step, timeout=self.timeout_s
            )
            if not ok:
                return None
            self._active += 1
            return self._published

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def close(self, wait: bool = True) -> None:
        self._httpd.shutdown() if wait else threading.Thread(target=self._httpd.shutdown, daemon=True).start()
        self._httpd.server_close()
        if wait:
            self._thread.join(timeout=self.timeout_s)


def _handler_for(server: PeerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = server.timeout_s

        def log_message(self, format: str, *args: object) -> None:  # quiet: errors reach the peer
            return

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            m = _PATH.match(self.path)
            if m is None:
                self.send_error(404, f"no such resource {self.path!r}")
                return
            pub = server.acquire(int(m.group(1)))
            if pub is None:
                self.send_error(503, f"step {m.group(1)} is not served (waited {server.timeout_s:.0f}s)")
                return
            try:
                if m.group(3) is None:
                    self._send_bytes(pub.manifest, body)
                elif m.group(3) in pub.files:
                    self._send_file(os.path.join(pub.directory, m.group(3)), body)
                else:
                    self.send_error(404, f"{m.group(3)!r} is not a file of step {pub.step}")
            finally:
                server.release()

        def _send_bytes(self, data: bytes, body: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _send_file(self, path: str, body: bool) -> None:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start, end = 0, size
                wanted = self.headers.get("Range")
                if wanted is not None:
                    r = _RANGE.match(wanted)
                    if r is None or int(r.group(1)) > int(r.group(2)) or int(r.group(2)) >= size:
                        self.send_error(416, f"range {wanted!r} outside a file of {size} bytes")
                        return
                    start, end = int(r.group(1)), int(r.group(2)) + 1
                self.send_response(206 if wanted is not None else 200)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if body:
                    f.seek(start)
                    shutil.copyfileobj(_Limited(f, end - start), self.wfile, _CHUNK)

    return Handler


class _Limited:
    """The next ``n`` bytes of a file, for ``copyfileobj``."""

    def __init__(self, f, n: int) -> None:
        self._f, self._left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = self._f.read(size)
        self._left -= len(data)
        return data


class PeerStorage(Storage):
    """A peer's published checkpoint of one step, read-only; the checkpoint's path is :data:`CKPT`."""

    def __init__(self, base_url: str, step: int, *, timeout_s: float) -> None:
        self.base = f"{base_url.rstrip('/')}/step/{step}"
        self.step = step
        self.timeout_s = float(timeout_s)
        self.deadline = time.monotonic() + self.timeout_s

    def describe(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def _open(self, path: str, method: str = "GET", headers: dict[str, str] | None = None):
        url = self.describe(path)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeoutError(f"{url}: the transfer of step {self.step} ran past {self.timeout_s:.0f}s")
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            return urllib.request.urlopen(req, timeout=left)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(2, f"{exc.reason}", url) from None
            if exc.code == 503:
                raise PeerTimeoutError(f"{url}: {exc.reason}") from None
            raise PeerTransferError(f"{url}: the peer answered {exc.code} {exc.reason}") from None
        except TimeoutError as exc:
            raise PeerTimeoutError(f"{url}: no answer within {left:.1f}s ({exc})") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise PeerTimeoutError(f"{url}: no answer within {left:.1f}s ({exc.reason})") from None
            raise PeerTransferError(f"{url}: cannot reach the peer ({exc.reason})") from None
        except OSError as exc:
            raise PeerTransferError(f"{url}: cannot reach the peer ({exc})") from None

    def read_document(self, name: str) -> bytes:
        with self._open(name) as resp:
            return self._read_all(resp, name)

    def _read_all(self, resp, path: str) -> bytes:
        try:
            return resp.read()
        except TimeoutError as exc:
            raise PeerTimeoutError(f"{self.describe(path)}: the peer stopped sending ({exc})") from None
        except OSError as exc:
            raise PeerTransferError(f"{self.describe(path)}: the transfer broke off ({exc})") from None

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        if len(out) == 0:
            return 0
        headers = {"Range": f"bytes={offset}-{offset + len(out) - 1}"}
        with self._open(path, headers=headers) as resp:
            data = self._read_all(resp, path)
        out[: len(data)] = data
        return len(data)

    def size(self, path: str) -> int:
        with self._open(path, method="HEAD") as resp:
            return int(resp.headers["Content-Length"])

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
        except FileNotFoundError:
            return False
        return True

    def is_prefix(self, path: str) -> bool:
        return path.strip("/") == CKPT

    def list(self, prefix: str) -> list[str]:
        raise UnsupportedStorageError(f"{self.describe(prefix)}: a peer's checkpoint cannot be listed")

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        raise UnsupportedStorageError(f"{self.describe(path)}: a peer's checkpoint is read-only")

    def delete(self, path: str) -> None:
        raise UnsupportedStorageError(f"{self.describe(path)}: a peer's checkpoint is read-only")


__all__ = ["CKPT", "PeerServer", "PeerStorage", "Published"]
