"""The Airflow hook of a ``dicomweb`` source: an HTTP connection -> an authenticated session with retries.

Built on the HTTP provider's ``HttpHook`` (base URL from host/schema/port, extras as options).
Authentication: **login + password** is HTTP basic; **password without a login** is a bearer token
(``Authorization: Bearer <password>``: a cloud DICOM store, a PACS behind an OAuth proxy).
Keeping the secret in the password field makes Airflow mask it in logs. Import this module in
task bodies only (Airflow's SDK is slow to import at DAG parse time).
"""

from __future__ import annotations

import requests
from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.exceptions import AirflowNotFoundException
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from medsync.errors import ConfigError


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
    ) -> None:
        retry = Retry(
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
        super().__init__(method="GET", http_conn_id=http_conn_id, adapter=HTTPAdapter(max_retries=retry))
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
