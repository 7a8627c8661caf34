"""The Airflow hook of a ``dicomweb`` source: an HTTP connection -> an authenticated session with retries.

Built on the HTTP provider's ``HttpHook`` (base URL from host/schema/port, extras as options).
Authentication: **login + password** is HTTP basic; **password without a login** is a bearer token
(``Authorization: Bearer <password>``: a cloud DICOM store, a PACS behind an OAuth proxy).
Keeping the secret in the password field makes Airflow mask it in logs. Import this module in
task bodies only (Airflow's SDK is slow to import at DAG parse time).

Pacing: every request the session sends, first attempts and urllib3's retries alike, first
claims a slot of the given :class:`~medsync.sources.base.RequestLimiter` (the source's run-wide
limit in A's database, or the client's own token bucket), so ``rate_limit_per_second`` bounds
what the PACS receives whatever retries, threads (the mirror) and tasks there are.
"""

from __future__ import annotations

from typing import Any

import requests
from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.exceptions import AirflowNotFoundException
from requests.adapters import HTTPAdapter
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from medsync.errors import ConfigError
from medsync.sources.base import RequestLimiter


class PacedRetry(Retry):
    """urllib3's retries, each of which claims a request slot after its backoff (or ``Retry-After``).

    urllib3 retries inside the adapter, below requests: without this a retry would reach the
    PACS unpaced. ``new`` is overridden because urllib3 makes a new ``Retry`` per attempt.
    """

    limiter: RequestLimiter | None = None

    def new(self, **kw: Any) -> PacedRetry:
        retry = super().new(**kw)
        retry.limiter = self.limiter
        return retry

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        super().sleep(response)
        if self.limiter is not None:
            self.limiter.acquire()


class PacedAdapter(HTTPAdapter):
    """An adapter whose every request (redirects included: requests sends each through here) claims a slot first."""

    def __init__(self, limiter: RequestLimiter | None, **kwargs: Any) -> None:
        self.limiter = limiter
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if self.limiter is not None:
            self.limiter.acquire()
        return super().send(request, *args, **kwargs)


class DicomwebHook(HttpHook):
    """A ``requests`` session for a PACS's DICOMweb (and, for Orthanc, REST) API.

    Its connection is of type ``medsync_dicomweb`` (the form's labels are declared by the in-repo
    provider distribution ``providers/medsync-airflow-provider``) or ``http``: the same fields are
    read either way.
    """

    conn_name_attr = "http_conn_id"
    default_conn_name = "medsync_pacs_api"
    conn_type = "medsync_dicomweb"
    hook_name = "medsync: PACS (DICOMweb)"

    def __init__(
        self,
        http_conn_id: str = default_conn_name,
        *,
        max_attempts: int = 6,
        max_backoff_seconds: float = 60.0,
        timeout: float = 30.0,
        limiter: RequestLimiter | None = None,
    ) -> None:
        retry = PacedRetry(
            total=max_attempts - 1,
            connect=max_attempts - 1,
            read=max_attempts - 1,
            status=max_attempts - 1,
            backoff_factor=0.5,
            backoff_max=max_backoff_seconds,
            status_forcelist=(429, 502, 503, 504),
            allowed_methods=frozenset({"GET", "HEAD"}),
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        retry.limiter = limiter
        super().__init__(method="GET", http_conn_id=http_conn_id, adapter=PacedAdapter(limiter, max_retries=retry))
        self.timeout = timeout

    def session(self) -> tuple[requests.Session, str, float]:
        """A new session, the base URL and the request timeout (extra ``timeout`` wins over the config)."""
        try:
            conn = self.get_connection(self.http_conn_id)
        except AirflowNotFoundException as exc:
            raise ConfigError(f"Airflow connection {self.http_conn_id!r} (the PACS) is not defined") from exc
        if not conn.host:
            raise ConfigError(f"Airflow connection {self.http_conn_id!r} has no host: set the PACS's base URL")
        timeout = self.timeout
        if "timeout" in conn.extra_dejson:
            try:
                timeout = float(conn.extra_dejson["timeout"])
            except (TypeError, ValueError):
                timeout = float("nan")
            if not timeout > 0:
                raise ConfigError(f"Airflow connection {self.http_conn_id!r}: extra timeout must be positive seconds")
        session = self.get_conn()
        session.headers.pop("timeout", None)
        if not conn.login and conn.password:
            session.headers["Authorization"] = f"Bearer {conn.password}"
        return session, self.base_url, timeout
