"""Airflow hook for service B's export API: an Airflow connection -> a ``BApiClient``.

Import this module inside task bodies only: it imports Airflow's task SDK, which
is slow to import at DAG parse time.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from medsync.config import SourceConfig
from medsync.errors import ConfigError
from medsync.sources.b_rest.client import BApiClient
from medsync.sources.base import RequestLimiter

DEFAULT_BASE_PATH = "/api/v1"

_DEFAULTS = SourceConfig.model_fields


class SourceApiHook(BaseHook):
    """Builds a :class:`~medsync.sources.b_rest.client.BApiClient` from an Airflow connection.

    The connection (conn_type ``http``; default id ``medsync_b_api``):

    - ``host``: either B's full base URL, e.g. ``https://b.example.internal/api/v1``
      (a URL without a path gets ``base_path`` appended), or a bare host name, e.g.
      ``b.example.internal``, completed by the fields below;
    - ``schema``: ``https`` (default) or ``http``, used with a bare host only
      (as in the HTTP provider, ``schema`` is the URL scheme, not a path);
    - ``port``: optional, with a bare host only;
    - ``password``: B's API key (required). Kept in the password field so that
      Airflow masks it in task logs; it is sent as the ``X-API-Key`` header;
    - ``extra`` (JSON, optional): ``base_path`` (default ``/api/v1``; ``/`` for an API
      at the root), ``timeout`` (seconds; overrides the source config's
      ``request_timeout_seconds``). Other extras are ignored; ``login`` is unused.

    Example (``AIRFLOW_CONN_MEDSYNC_B_API``)::

        {"conn_type": "http", "host": "https://b.example.internal/api/v1", "password": "<key>"}

    Retry and rate settings come from the source config (:meth:`from_source_config`)
    or the constructor; the defaults are ``SourceConfig``'s.
    """

    conn_name_attr = "api_conn_id"
    default_conn_name = "medsync_b_api"
    conn_type = "http"
    hook_name = "Medsync source API (service B)"

    def __init__(
        self,
        api_conn_id: str = default_conn_name,
        *,
        timeout: float = _DEFAULTS["request_timeout_seconds"].default,
        max_attempts: int = _DEFAULTS["max_attempts"].default,
        max_backoff_seconds: float = _DEFAULTS["max_backoff_seconds"].default,
        rate_limit_per_second: float | None = _DEFAULTS["rate_limit_per_second"].default,
    ) -> None:
        super().__init__()
        self.api_conn_id = api_conn_id
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_backoff_seconds = max_backoff_seconds
        self.rate_limit_per_second = rate_limit_per_second

    @classmethod
    def from_source_config(cls, cfg: SourceConfig) -> SourceApiHook:
        """The hook for ``cfg``'s API connection with ``cfg``'s timeout, retry and rate settings."""
        return cls(
            cfg.connections.api_conn_id,
            timeout=cfg.request_timeout_seconds,
            max_attempts=cfg.max_attempts,
            max_backoff_seconds=cfg.max_backoff_seconds,
            rate_limit_per_second=cfg.rate_limit_per_second,
        )

    def get_conn(self, limiter: RequestLimiter | None = None) -> BApiClient:
        """A new client for the connection; close it (or use ``with``) when done.

        ``limiter`` paces its requests when given (a limit shared with other clients); otherwise
        the client paces itself at ``rate_limit_per_second``.

        Raises ``ConfigError`` when the connection does not exist, has no password,
        or its host, schema, port or extras do not make a usable URL or timeout.
        """
        try:
            conn = self.get_connection(self.api_conn_id)
        except AirflowNotFoundException as exc:
            raise ConfigError(f"Airflow connection {self.api_conn_id!r} (B's API) is not defined") from exc
        if not conn.password:
            raise ConfigError(f"Airflow connection {self.api_conn_id!r} has no password: put B's API key there")
        extra = conn.extra_dejson
        return BApiClient(
            self._base_url(conn.host, conn.schema, conn.port, extra),
            conn.password,
            timeout=self._timeout(extra),
            max_attempts=self.max_attempts,
            max_backoff_seconds=self.max_backoff_seconds,
            rate_limit_per_second=self.rate_limit_per_second,
            limiter=limiter,
        )

    def _base_url(self, host: str | None, schema: str | None, port: int | None, extra: dict[str, Any]) -> str:
        where = f"Airflow connection {self.api_conn_id!r}"
        host = (host or "").strip()
        if not host:
            raise ConfigError(f"{where} has no host: set B's base URL, e.g. https://b.example.internal/api/v1")
        base_path = extra.get("base_path", DEFAULT_BASE_PATH)
        if not isinstance(base_path, str):
            raise ConfigError(f"{where}: extra base_path must be a string such as /api/v1")
        base_path = "/" + base_path.strip().strip("/") if base_path.strip().strip("/") else ""
        if "://" in host:
            path = urlsplit(host).path
            return host.rstrip("/") if path.strip("/") else host.rstrip("/") + base_path
        scheme = (schema or "https").strip().lower()
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}: schema must be http or https (the URL scheme), got {schema!r}")
        if "/" in host or ":" in host:
            raise ConfigError(
                f"{where}: host must be a bare host name (port and path go in port and extra base_path) "
                f"or a full URL with a scheme"
            )
        netloc = f"{host}:{int(port)}" if port else host
        return f"{scheme}://{netloc}{base_path}"

    def _timeout(self, extra: dict[str, Any]) -> float:
        if "timeout" not in extra:
            return self.timeout
        try:
            timeout = float(extra["timeout"])
        except (TypeError, ValueError):
            timeout = float("nan")
        if not timeout > 0:
            raise ConfigError(
                f"Airflow connection {self.api_conn_id!r}: extra timeout must be a positive number of seconds"
            )
        return timeout
