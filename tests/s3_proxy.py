"""A small HTTP proxy between the S3 client and the real gateway, for fault tests.

Requests pass through unchanged (the Host header too, so signatures still match),
except that a :class:`Fault` rule can answer the first N matching requests with an
error status, or delay them, before the gateway sees them.  ``on_request`` lets a
test act at a precise moment (e.g. kill the gateway after the second part upload).
If the gateway cannot be reached the client's connection is simply closed, which is
what a client sees when a server dies.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Fault:
    """Hit the first ``count`` requests for which ``match(method, path)`` is true."""

    match: Callable[[str, str], bool]
    count: int
    status: int = 503
    delay_s: float = 0.0  # with status 0: delay, then forward
    hits: int = 0


def is_part_upload(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


def is_get(method: str, path: str) -> bool:
    return method == "GET" and "list-type" not in path and "uploads" not in path


_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test proxy</Message></Error>"
)


class S3Proxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.faults: list[Fault] = []
        self.on_request: Callable[[str, str], None] | None = None
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.hits < f.count and f.match(method, path):
                    f.hits += 1
                    return f
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.on_request is not None:
            self.on_request(h.command, h.path)
        fault = self._pick(h.command, h.path)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status:
            code = {503: "SlowDown", 500: "InternalError"}.get(fault.status, "ServiceUnavailable")
            payload = b"" if h.command == "HEAD" else _ERROR_BODY.format(code=code).encode()
            h.send_response(fault.status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        try:
            conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            headers = {k: v for k, v in h.headers.items() if k.lower() != "connection"}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            h.close_connection = True  # the gateway is gone: so is the client's connection
            return
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                h.send_header(k, v)
        # a HEAD answer has no body but states the object's length
        length = resp.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(data))
        h.send_header("Content-Length", length)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        conn.close()
