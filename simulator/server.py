"""The simulator over a real socket: ``BSimulator`` = catalogue + API + threaded HTTP server."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from simulator.api import ADMIN_PREFIX, API_PREFIX, Api
from simulator.config import FaultConfig, SimConfig
from simulator.httpd import RequestHandler, ThreadingServer
from simulator.model import Catalogue


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
        self._server: ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BSimulator:
        """Listen and serve in a background thread (idempotent). Returns self."""
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (RequestHandler,), {"api": self.api})
        self._server = ThreadingServer((self._host, self._port), handler)
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
