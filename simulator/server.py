"""The simulator over a real socket: ``BSimulator`` = catalogue + API + threaded HTTP server."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar

from simulator.api import ADMIN_PREFIX, API_PREFIX, Api, ApiError, Response
from simulator.config import FaultConfig, SimConfig
from simulator.model import Catalogue

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as they would with B
    disable_nagle_algorithm = True  # small responses must not wait for delayed ACKs
    server_version = "BSim/1.0"
    api: ClassVar[Api]

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
        # Silent on purpose: requests carry the API key in a header and B's keys are never logged.
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
            body = b'{"data":[{"id":"x"' + b" " * 200 + b"]}"
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


class BSimulator(Catalogue):
    """Service B for tests: the catalogue's Python API plus B's REST API on 127.0.0.1.

    ``with BSimulator(SimConfig(...), api_key="k") as sim:`` starts a server on a free port;
    ``sim.base_url`` is ``http://127.0.0.1:PORT/api/v1`` and ``sim.admin_url`` its ``/_sim``.
    Every Catalogue method (update, delete, live_records, counts, advance, ...) is available,
    plus faults (``set_faults``) and counters (``stats``). ``port=0`` picks a free port.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        api_key: str = "test-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultConfig | None = None,
    ) -> None:
        super().__init__(config or SimConfig())
        self.api = Api(self, api_key, faults)
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BSimulator:
        """Listen and serve in a background thread (idempotent). Returns self."""
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"api": self.api})
        self._server = _Server((self._host, self._port), handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="bsim-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and every open connection (idempotent).

        ``start()`` again listens on the same port, so the same ``base_url`` comes back:
        stop/start simulates an outage of B.
        """
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_open_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> BSimulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (known once started when constructed with port=0)."""
        return self._port

    @property
    def root_url(self) -> str:
        """``http://host:port`` without a path."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return f"http://{self._host}:{self._port}"

    @property
    def base_url(self) -> str:
        """B's API base URL, e.g. ``http://127.0.0.1:54321/api/v1``."""
        return self.root_url + API_PREFIX

    @property
    def admin_url(self) -> str:
        """Admin API base URL, e.g. ``http://127.0.0.1:54321/_sim``."""
        return self.root_url + ADMIN_PREFIX

    # ------------------------------------------------------------------ faults and stats

    @property
    def faults(self) -> FaultConfig:
        """Faults in force."""
        return self.api.faults

    def set_faults(self, config: FaultConfig | None = None, **fields: Any) -> FaultConfig:
        """Replace the faults in force (``set_faults()`` turns all off), e.g. ``set_faults(throttle_every=3)``."""
        return self.api.set_faults(config, **fields)

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset: ``requests``, ``responses`` by status, ``faults`` by kind
        (drop, error, throttle, slow, expire, rate_limit), ``pages``, ``records``, ..."""
        return self.api.stats()

    def reset_stats(self) -> None:
        """Zero the counters (the every-k-th fault schedule restarts too)."""
        self.api.reset_stats()

    def reset_all(self) -> None:
        """Data and clock as constructed, faults as at construction, counters zero."""
        self.api.reset()
