"""A real HTTP reverse proxy on loopback that fails chosen requests, for tests of a client's retries.

It forwards each GET to the upstream server (a real Orthanc) with its headers and answers with
the upstream's status, content type and body, except for requests whose path contains a fragment
given to :meth:`FaultyProxy.fail`: those get the given status, a number of times or always.
It records every path it was asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

FORWARDED = ("Authorization", "Accept")


@dataclass
class FaultyProxy:
    upstream: str
    url: str = ""
    paths: list[str] = field(default_factory=list)
    _faults: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, fragment: str, *, times: int = -1, status: int = 500) -> None:
        """Answer requests whose path contains ``fragment`` with ``status``, ``times`` times (-1: always)."""
        with self._lock:
            self._faults[fragment] = [times, status]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.paths.clear()

    def asked(self, fragment: str) -> int:
        """How many requests had ``fragment`` in their path."""
        with self._lock:
            return sum(fragment in p for p in self.paths)

    def fault_for(self, path: str) -> int | None:
        with self._lock:
            self.paths.append(path)
            for fragment, fault in self._faults.items():
                if fragment in path and fault[0] != 0:
                    fault[0] -= 1 if fault[0] > 0 else 0
                    return fault[1]
        return None


@contextmanager
def faulty_proxy(upstream: str) -> Iterator[FaultyProxy]:
    """A proxy to ``upstream`` (``http://host:port``) on 127.0.0.1; yields it with its ``url`` set."""
    proxy = FaultyProxy(upstream.rstrip("/"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass  # quiet

        def do_GET(self) -> None:
            status = proxy.fault_for(self.path)
            if status is not None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {h: v for h in FORWARDED if (v := self.headers.get(h)) is not None}
            answer = requests.get(f"{proxy.upstream}{self.path}", headers=headers, timeout=60)
            self.send_response(answer.status_code)
            if "Content-Type" in answer.headers:
                self.send_header("Content-Type", answer.headers["Content-Type"])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    proxy.url = f"http://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
