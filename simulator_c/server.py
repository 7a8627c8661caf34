"""The simulator over a real socket: ``CSimulator`` = catalogue + API + threaded HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from simulator.httpd import RequestHandler, ThreadingServer
from simulator_c.api import ADMIN_PREFIX, API_PREFIX, Api
from simulator_c.config import FaultConfig, SimConfig
from simulator_c.model import Catalogue


class _Handler(RequestHandler):
    server_version = "CSim/1.0"
    drop_sample = b'[{"uuid":"260088bd-fad9-493b-a062-8b83443b76fe","modified":1793666652540' + b" " * 200 + b"}]"


class CSimulator(Catalogue):
    """Service C for tests: the catalogue's Python API plus C's REST API v2 on 127.0.0.1.

    ``with CSimulator(SimConfig(...), token="t") as sim:`` listens on a free port;
    ``sim.base_url`` is ``http://127.0.0.1:PORT/v2`` and ``sim.admin_url`` its ``/_sim``.
    ``tokens`` adds further bearer tokens with their scopes (``{"no-read": ()}`` -> 403).
    Every Catalogue method (update, delete, restore, merge_participants, move_file, advance,
    live_records, deletions, counts, defects, iter_files...) is available, plus faults
    (``set_faults``) and counters (``stats``).
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        token: str = "test-token",  # noqa: S107 (a simulator for tests; not a credential)
        *,
        tokens: Mapping[str, Iterable[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultConfig | None = None,
    ) -> None:
        super().__init__(config or SimConfig())
        self.token = token
        self.api = Api(self, token, faults, tokens)
        self._host = host
        self._port = port
        self._server: ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> CSimulator:
        """Listen and serve in a background thread (idempotent). Returns self."""
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"api": self.api})
        self._server = ThreadingServer((self._host, self._port), handler)
        self._port = self._server.server_address[1]
        self.api.root_url = f"http://{self._host}:{self._port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="csim-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (idempotent); ``start()`` again serves on the
        same port, so stop/start simulates an outage of C."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_open_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> CSimulator:
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
        """C's API base URL, e.g. ``http://127.0.0.1:54321/v2``."""
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
        """Replace the faults in force, e.g. ``set_faults(internal_every=3)``. Fields not given take
        their defaults: ``set_faults()`` = no injected faults with C's 10/s limit on;
        ``set_faults(rate_limit=None)`` = nothing at all."""
        return self.api.set_faults(config, **fields)

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset: ``requests`` (API, admin excluded), ``authorized`` (past
        401/403), ``responses`` by status, ``faults`` by kind (drop, gateway, internal,
        unavailable, throttle, slow, expire, rate_limit), ``pages``, ``records``,
        ``snapshots_issued``, ``snapshots_gone`` (410 by age/unknown), ``endpoints``,
        ``peak_requests_per_second`` (most accepted requests of one token in any one second) and
        ``requests_per_second`` ({wall-clock epoch second: accepted requests}, last 120 s)."""
        return self.api.stats()

    def reset_stats(self) -> None:
        """Zero the counters (the every-k-th fault schedule restarts too)."""
        self.api.reset_stats()

    def reset_all(self) -> None:
        """Data, snapshots and clock as constructed, faults as at construction, counters zero."""
        self.api.reset()
