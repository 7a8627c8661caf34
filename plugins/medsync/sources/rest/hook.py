"""Airflow hook of protocol ``rest``: an Airflow HTTP connection -> a :class:`RestClient`.

Import this module inside task bodies only: it imports the HTTP provider and Airflow's task SDK,
which are slow to import at DAG parse time.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.exceptions import AirflowNotFoundException

from medsync.config import SourceConfig
from medsync.errors import ConfigError
from medsync.sources.base import RequestLimiter
from medsync.sources.rest.client import RestClient
from medsync.sources.rest.spec import BasicAuth, RestApi

_DEFAULTS = SourceConfig.model_fields


class RestSourceHook(HttpHook):
    """Builds a :class:`~medsync.sources.rest.client.RestClient` from an Airflow HTTP connection.

    The connection (the source config's ``connections.api_conn_id``) is of type ``medsync_rest``,
    whose form says where the secret goes (declared by the in-repo provider distribution
    ``providers/medsync-airflow-provider``, which is how Airflow finds connection types), or
    ``http``: only the fields below are read, whatever the type.

    - ``host``: the API's full base URL, e.g. ``https://b.example.internal/api/v1`` (a URL
      without a path gets the spec's ``base_path`` appended), or a bare host name, e.g.
      ``b.example.internal``, completed by ``schema``, ``port`` and ``base_path``. As in the HTTP
      provider, ``schema`` is the URL scheme; unlike it, a bare host defaults to ``https``, so the
      secret never travels in clear text by omission;
    - ``port``: optional, with a bare host only;
    - ``password``: the secret (required): the API key or bearer token, or basic auth's password.
      Kept in the password field so that Airflow masks it in task logs;
    - ``login``: basic auth's user name (``auth: {type: basic}`` only; ignored otherwise);
    - ``extra`` (JSON, optional): ``timeout`` (seconds; overrides the source config's
      ``request_timeout_seconds``), ``base_path`` (overrides the spec's, e.g. for a test
      deployment; ``/`` for an API at the root). Other extras are ignored.

    Example (``AIRFLOW_CONN_MEDSYNC_B_API``)::

        {"conn_type": "http", "host": "https://b.example.internal/api/v1", "password": "<key>"}

    :param api_conn_id: the Airflow connection's id.
    :param api: the source's validated ``api:`` section.
    :param page_size: records per request (the config's ``page_size``).
    :param timeout: seconds per request unless the connection's extra says otherwise.
    :param max_attempts: attempts per request before a transient failure fails.
    :param max_backoff_seconds: the longest wait between attempts.
    :param rate_limit_per_second: the client's own pace when no ``limiter`` is given.
    :param limiter: a pace shared with other clients (a run-wide limit), or None.
    :param name: the source's name, for messages and logs.
    """

    conn_name_attr = "api_conn_id"
    default_conn_name = "medsync_api"
    conn_type = "medsync_rest"
    hook_name = "medsync: REST source"

    def __init__(
        self,
        api_conn_id: str = default_conn_name,
        *,
        api: RestApi,
        page_size: int = _DEFAULTS["page_size"].default,
        timeout: float = _DEFAULTS["request_timeout_seconds"].default,
        max_attempts: int = _DEFAULTS["max_attempts"].default,
        max_backoff_seconds: float = _DEFAULTS["max_backoff_seconds"].default,
        rate_limit_per_second: float | None = _DEFAULTS["rate_limit_per_second"].default,
        limiter: RequestLimiter | None = None,
        name: str = "source",
    ) -> None:
        # The client brings its own session and adapters: the provider's keep-alive adapter is unused.
        super().__init__(method="GET", http_conn_id=api_conn_id, tcp_keep_alive=False)
        self.api_conn_id = api_conn_id
        self.api = api
        self.page_size = page_size
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_backoff_seconds = max_backoff_seconds
        self.rate_limit_per_second = rate_limit_per_second
        self.limiter = limiter
        self.name = name

    @classmethod
    def from_source(cls, cfg: SourceConfig, api: RestApi, limiter: RequestLimiter | None = None) -> RestSourceHook:
        """The hook of ``cfg``'s API connection with ``cfg``'s page size, timeout, retry and rate settings.

        :param cfg: the source's config.
        :param api: its validated ``api:`` section.
        :param limiter: a run-wide pace; None: the client paces itself at ``cfg.rate_limit_per_second``.
        """
        return cls(
            cfg.connections.api_conn_id,
            api=api,
            page_size=cfg.page_size,
            timeout=cfg.request_timeout_seconds,
            max_attempts=cfg.max_attempts,
            max_backoff_seconds=cfg.max_backoff_seconds,
            rate_limit_per_second=cfg.rate_limit_per_second,
            limiter=limiter,
            name=cfg.name,
        )

    def get_conn(  # type: ignore[override]  # a medsync client, not a bare requests session
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> RestClient:
        """A new client for the connection; close it (or use ``with``) when done.

        ``headers`` and ``extra_options`` (HttpHook's) are not supported: the spec says what is sent.
        Raises ``ConfigError`` when the connection does not exist, has no password (or, for basic
        auth, no login), or its host, schema, port or extras do not make a usable URL or timeout.
        """
        if headers or extra_options:
            raise ConfigError("RestSourceHook.get_conn takes no headers or extra options: the api section says them")
        where = f"Airflow connection {self.api_conn_id!r}"
        try:
            conn = self.get_connection(self.api_conn_id)
        except AirflowNotFoundException as exc:
            raise ConfigError(f"{where} (the {self.name} API) is not defined") from exc
        if not conn.password:
            raise ConfigError(f"{where} has no password: put the {self.name} API's secret (key or token) there")
        basic = isinstance(self.api.auth, BasicAuth)
        if basic and not conn.login:
            raise ConfigError(f"{where} has no login: the {self.name} API uses basic auth")
        extra = conn.extra_dejson
        return RestClient(
            self._base_url(conn.host, conn.schema, conn.port, extra),
            self.api,
            conn.password,
            login=conn.login if basic else None,
            page_size=self.page_size,
            timeout=self._timeout(extra),
            max_attempts=self.max_attempts,
            max_backoff_seconds=self.max_backoff_seconds,
            limiter=self.limiter,
            rate_limit_per_second=self.rate_limit_per_second,
            name=self.name,
        )

    def _base_url(self, host: str | None, schema: str | None, port: int | None, extra: dict[str, Any]) -> str:
        """HttpHook's base URL (``host``, or ``schema://host:port``) plus the base path when it has none."""
        where = f"Airflow connection {self.api_conn_id!r}"
        host = (host or "").strip()
        if not host:
            raise ConfigError(f"{where} has no host: set the API's base URL, e.g. https://b.example.internal/api/v1")
        base_path = extra.get("base_path", self.api.base_path)
        if not isinstance(base_path, str):
            raise ConfigError(f"{where}: extra base_path must be a string such as /api/v1")
        base_path = "/" + base_path.strip().strip("/") if base_path.strip().strip("/") else ""
        if "://" in host:
            if port:
                raise ConfigError(f"{where}: with a full URL in host, put the port in the URL, not in port")
            base_url = host.rstrip("/")
        else:
            if "/" in host or ":" in host:
                raise ConfigError(
                    f"{where}: host must be a bare host name (port and path go in port and extra base_path) "
                    f"or a full URL with a scheme"
                )
            scheme = (schema or "https").strip().lower()
            if scheme not in ("http", "https"):
                raise ConfigError(f"{where}: schema must be http or https (the URL scheme), got {schema!r}")
            base_url = f"{scheme}://{host}:{int(port)}" if port else f"{scheme}://{host}"
        self.base_url = base_url  # as HttpHook keeps it
        return base_url if urlsplit(base_url).path.strip("/") else base_url + base_path

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
