"""A threading HTTP/1.1 server that only moves bytes: shared by the simulators of B and C.

Each simulator has a transport-free ``handle(method, path, query, headers, body) -> Response``
object (its ``Api``); ``RequestHandler`` reads a request, asks it, and writes the answer in one
write, or drops the connection the way the answer says (``Response.drop``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from simulator.api import ApiError, Response

log = logging.getLogger(__name__)


class Handles(Protocol):
    """What the server needs of a simulator's API."""

    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> Response: ...


class ThreadingServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that can also end its open keep-alive connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def close_open_connections(self) -> None:
        """End keep-alive connections too, so a stopped simulator really stops answering."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # already closed by its handler

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (timeouts on slow pages) are normal here: log, don't print.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class RequestHandler(BaseHTTPRequestHandler):
    """Bind ``api`` in a subclass (``type(name, (RequestHandler,), {"api": api})``)."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as they would with the service
    disable_nagle_algorithm = True  # small responses must not wait for delayed ACKs
    server_version = "BSim/1.0"
    # What a "mid_body" drop sends half of: a 200 whose body ends early.
    drop_sample: ClassVar[bytes] = b'{"data":[{"id":"x"' + b" " * 200 + b"]}"
    api: ClassVar[Handles]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        # Silent on purpose: requests carry credentials in headers, which are never logged.
        return

    def _dispatch(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._send(ApiError(400, "bad_request", "invalid Content-Length").response())
            return
        body = self.rfile.read(length) if length > 0 else b""
        resp = self.api.handle(method, path, query, self.headers, body)
        if resp.delay > 0:
            time.sleep(resp.delay)
        if resp.drop:
            self._drop(resp.drop)
            return
        self._send(resp)

    def _head(self, resp: Response) -> bytes:
        lines = [f"HTTP/1.1 {resp.status} {HTTPStatus(resp.status).phrase}"]
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        lines.append(f"Content-Length: {len(resp.body)}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, resp: Response) -> None:
        # One write for head and body: no extra round trip or Nagle stall per page.
        self.wfile.write(self._head(resp) + resp.body)

    def _drop(self, mode: str) -> None:
        self.close_connection = True
        if mode == "mid_body":
            body = self.drop_sample
            fake = Response(200, body)
            self.wfile.write(self._head(fake) + body[: len(body) // 2])
        elif mode == "reset":
            # SO_LINGER 0 turns close() into a TCP RST ("connection reset by peer"); closing here,
            # before socketserver's own shutdown(SHUT_WR), keeps a FIN from going out first.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # the peer went first; nothing left to drop
