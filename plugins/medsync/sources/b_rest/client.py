"""HTTP client for service B's export API (protocol ``b_rest``).

:class:`BApiClient` pages through one resource's changes in a time window, reads
``/counts`` and single records, and handles everything B's contract asks of a
client: retries with backoff on 5xx, 429 and dropped connections, resuming after an
expired cursor, a request rate limit, and never revealing the API key.

No Airflow import here: the hook in ``medsync.hooks.source_api`` builds this client
from an Airflow connection, and tests build it directly.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from medsync.errors import ConfigError, SourceApiError, SourceUnavailableError
from medsync.sources.b_rest import RESOURCES
from medsync.sources.base import RequestLimiter

log = logging.getLogger(__name__)

RESOURCE_NAMES: frozenset[str] = frozenset(RESOURCES.values())
"""B's list resources: ``patients``, ``studies``, ``series``, ``images``."""

MAX_PAGE_SIZE = 1000
"""B answers 400 to a ``limit`` outside 1..1000."""

MAX_CONNECT_TIMEOUT_SECONDS = 10.0
"""A host that does not accept a TCP connection in this long is down; reads get the full timeout."""

BACKOFF_BASE_SECONDS = 1.0
"""First retry waits 0.5-1 s, then 1-2 s, 2-4 s, ... (capped at ``max_backoff_seconds``)."""

MAX_STALLED_RESUMES = 3
"""Cursor expiries in a row without any progress before a window gives up."""

_ERROR_TEXT_MAX_CHARS = 200

# Failures that say nothing about the request itself: the same request may well succeed later.
# requests wraps most urllib3/http.client errors, the raw ones are listed in case one slips through.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,  # refused, reset, RemoteDisconnected, ConnectTimeout
    requests.exceptions.Timeout,  # ReadTimeout
    requests.exceptions.ChunkedEncodingError,  # connection dropped mid-body
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
)


# --- keeping the key out of http.client's debug output ---------------------------------------------
# http.client prints every header it sends (print(), not logging) when HTTPConnection.debuglevel > 0,
# which is how requests' documentation suggests debugging. The connections of our own sessions
# ignore that switch, so turning it on for some other library cannot print B's API key into a task log.


class _QuietHTTPConnection(urllib3.connection.HTTPConnection):
    debuglevel = 0

    def set_debuglevel(self, level: int) -> None:
        """Ignored: this connection never prints its headers."""


class _QuietHTTPSConnection(urllib3.connection.HTTPSConnection):
    debuglevel = 0

    def set_debuglevel(self, level: int) -> None:
        """Ignored: this connection never prints its headers."""


class _QuietHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _QuietHTTPConnection


class _QuietHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _QuietHTTPSConnection


_QUIET_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": _QuietHTTPConnectionPool,
    "https": _QuietHTTPSConnectionPool,
}


def _quieten(manager: urllib3.PoolManager) -> None:
    # SOCKS proxy managers bring their own pool classes; only the standard ones are swapped.
    if manager.pool_classes_by_scheme.get("http") is HTTPConnectionPool:
        manager.pool_classes_by_scheme = dict(_QUIET_POOLS)


class _QuietAdapter(HTTPAdapter):
    """requests' adapter with connections that never print headers; no retries of its own."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _quieten(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _quieten(manager)
        return manager


def _new_session(base_url: str) -> requests.Session:
    """A session for ``base_url`` whose environment settings are read once, here.

    requests reads the environment (proxies, ``NO_PROXY``, CA bundle, ``.netrc``) again for
    every request when ``trust_env`` is on: about a millisecond a page in a worker's large
    environment, a tenth of a pull's CPU. This session resolves them for B's URL now, as
    requests would, and then stops looking.
    """
    session = requests.Session()
    adapter = _QuietAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.auth = requests.utils.get_netrc_auth(base_url)
    session.trust_env = False
    return session


# --- rate limiting -----------------------------------------------------------------------------------


class TokenBucket:
    """Thread-safe token bucket: on average at most ``rate`` acquisitions per second.

    ``burst`` tokens can be spent at once (default 1: calls are simply spaced
    ``1/rate`` seconds apart). A caller that finds the bucket empty reserves the
    next token and sleeps outside the lock, so concurrent callers queue up fairly
    instead of spinning.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ConfigError(f"rate limit must be positive, got {rate!r}")
        self._rate = float(rate)
        self._burst = max(float(burst), 1.0)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def acquire(self) -> float:
        """Takes one token, sleeping until it is available; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1.0
            # A negative balance is a debt: the tokens already promised to callers still asleep.
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# --- the client --------------------------------------------------------------------------------------


class _CursorExpiredError(SourceApiError):
    """B answered 400 ``cursor_expired``; :meth:`BApiClient.iter_pages` resumes without the cursor."""


@dataclass
class _WindowStats:
    pages: int = 0
    records: int = 0
    retries: int = 0
    resumes: int = 0


def rfc3339(moment: datetime) -> str:
    """``moment`` as RFC 3339 in UTC with microseconds (``2026-11-19T00:00:00.000000Z``)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a naive datetime is ambiguous; pass an aware one (e.g. tzinfo=UTC)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: object) -> datetime:
    """An RFC 3339 timestamp from B (any offset, 0-6 fractional digits) as an aware datetime.

    Raises ``ValueError`` for anything else, including a timestamp without an offset.
    """
    if not isinstance(value, str):
        raise ValueError("not a string")
    parsed = datetime.fromisoformat(value.strip().upper())  # RFC 3339 allows a lowercase 't'/'z'
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError("no UTC offset")
    return parsed


def _truncate(text: str, limit: int = _ERROR_TEXT_MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_of(response: requests.Response) -> tuple[str, str]:
    """B's error code and message from an error response; placeholders when the body is not B's."""
    try:
        body = response.json()
    except ValueError:
        # Not B's JSON (a proxy's HTML page, say): its text is not worth repeating.
        return "unknown", "response body is not B's JSON error"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "unknown", "response body is not B's JSON error"
    return _truncate(str(error.get("code", "unknown")), 64), _truncate(str(error.get("message", "")))


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds, or None when absent or not the integer form B promises."""
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        return None
    return float(max(seconds, 0))


class BApiClient:
    """Client of B's export API at ``base_url`` (e.g. ``https://b.example.internal/api/v1``).

    Every request carries the key in the ``X-API-Key`` header, a (connect, read)
    timeout of (``min(timeout, 10)``, ``timeout``) seconds, and first waits for the
    rate limiter: ``limiter`` when given (a limit shared with other clients, e.g. every task
    of a run through ``medsync.request_limit``), else at most ``rate_limit_per_second``
    requests per second per client (None means no limit). Threads may share one client:
    the limiter is thread-safe.

    Each request is tried at most ``max_attempts`` times. 5xx answers, connection
    errors, dropped connections and timeouts are retried after an exponential
    backoff with jitter (0.5-1 s, 1-2 s, 2-4 s, ... never more than
    ``max_backoff_seconds``); a 429 is retried after its ``Retry-After`` seconds
    (capped at ``max_backoff_seconds``), and counts as an attempt. Past the budget
    the client raises ``SourceUnavailableError``. A refused key (401/403) raises
    ``SourceApiError`` at once, as does any other 4xx (with B's error code and
    message), a redirect (never followed, so the key goes nowhere else) or a body
    that is not the JSON the contract promises.

    Logs (``medsync.sources.b_rest.client``): DEBUG per page, INFO per window,
    WARNING per retry. They name resources, windows, counts and HTTP statuses only:
    never the key, the headers, or record contents.

    ``sleep``, ``clock`` (monotonic seconds) and ``rng`` are there so tests need
    not wait. When ``session`` is given the caller owns it (and its adapters);
    otherwise the client makes one whose connections never print their headers,
    and :meth:`close` (or ``with``) closes it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float,
        max_attempts: int,
        max_backoff_seconds: float,
        rate_limit_per_second: float | None,
        limiter: RequestLimiter | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._base_url = self._checked_base_url(base_url)
        if not isinstance(api_key, str) or not api_key or not all(33 <= ord(c) <= 126 for c in api_key):
            # The key itself is never repeated, not even in this message.
            raise ConfigError("B's API key is empty or contains whitespace or non-ASCII characters")
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive, got {timeout!r}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts!r}")
        if not max_backoff_seconds > 0:
            raise ConfigError(f"max_backoff_seconds must be positive, got {max_backoff_seconds!r}")
        self._headers = {"X-API-Key": api_key, "Accept": "application/json", "User-Agent": "medsync"}
        self._timeout = (min(float(timeout), MAX_CONNECT_TIMEOUT_SECONDS), float(timeout))
        self._max_attempts = int(max_attempts)
        self._max_backoff = float(max_backoff_seconds)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._limiter: RequestLimiter | None = limiter
        if limiter is None and rate_limit_per_second is not None:
            self._limiter = TokenBucket(rate_limit_per_second, clock=clock, sleep=sleep)
        self._owns_session = session is None
        self._session = session if session is not None else _new_session(self._base_url)

    @staticmethod
    def _checked_base_url(base_url: str) -> str:
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"B's base URL must be http(s)://host[:port]/path, got {base_url!r}")
        if parts.username or parts.password:
            raise ConfigError("B's base URL must not carry credentials; the API key goes in the password")
        if parts.query or parts.fragment:
            raise ConfigError(f"B's base URL must not have a query or fragment, got {base_url!r}")
        return base_url.strip().rstrip("/")

    def __repr__(self) -> str:
        return f"BApiClient(base_url={self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The API's root, without a trailing slash."""
        return self._base_url

    @property
    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeout of every request, in seconds."""
        return self._timeout

    @property
    def max_attempts(self) -> int:
        return self._max_attempts

    @property
    def max_backoff_seconds(self) -> float:
        return self._max_backoff

    @property
    def rate_limit_per_second(self) -> float | None:
        rate = getattr(self._limiter, "rate", None)
        return float(rate) if rate is not None else None

    def close(self) -> None:
        """Closes the session if the client made it."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> BApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- public calls ----------------------------------------------------------------------------

    def iter_pages(
        self,
        resource: str,
        since: datetime,
        until: datetime,
        *,
        page_size: int,
        include_deleted: bool = True,
    ) -> Iterator[list[dict[str, Any]]]:
        """Records of ``resource`` with ``since <= updated_at < until``, one list per page.

        ``since`` and ``until`` must be aware datetimes: both are always sent (in
        UTC), so no request is ever open-ended; ``since == until`` yields nothing
        without asking B. Pages come in B's order, ``(updated_at, id)``, as B's raw
        dicts (tombstones included unless ``include_deleted`` is false); empty pages
        are not yielded. Only one page is held at a time.

        When B says the cursor expired, paging restarts without a cursor from the
        last ``updated_at`` received (inclusive), so some records are yielded twice:
        callers must dedup by id, keeping the latest ``updated_at``. A record may
        also appear twice because it changed during paging (B's contract).

        Raises ``ValueError`` for arguments outside the contract, ``SourceApiError``
        / ``SourceUnavailableError`` as described on the class.
        """
        self._check_resource(resource)
        start, end = rfc3339(since), rfc3339(until)  # also refuses naive datetimes
        if since > until:
            raise ValueError(f"window starts after it ends: [{start}, {end})")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        if since == until:
            log.debug("B %s: empty window [%s, %s), nothing to ask", resource, start, end)
            return

        stats = _WindowStats()
        started = self._clock()
        outcome = "stopped early"
        try:
            yield from self._window_pages(
                resource, since, end, page_size=page_size, include_deleted=include_deleted, stats=stats
            )
            outcome = "done"
        except GeneratorExit:
            raise  # the caller stopped iterating: not a failure
        except BaseException:
            outcome = "failed"
            raise
        finally:
            log.info(
                "B %s window [%s, %s) %s: %d pages, %d records, %.1f s, %d retries, %d cursor resumes",
                resource, start, end, outcome, stats.pages, stats.records,
                self._clock() - started, stats.retries, stats.resumes,
            )  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Live (not deleted) records per resource right now: ``{"patients": n, "studies": ..., ...}``."""
        body = self._get_json("counts", None, what="GET /counts")
        if not isinstance(body, dict):
            raise SourceApiError("B GET /counts: the answer is not a JSON object")
        result: dict[str, int] = {}
        for resource in sorted(RESOURCE_NAMES):
            value = body.get(resource)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SourceApiError(f"B GET /counts: {resource!r} is missing or not a count")
            result[resource] = value
        return result

    def get_record(self, resource: str, record_id: str) -> dict[str, Any] | None:
        """One record of ``resource`` by B's id (a tombstone if deleted), or None if B does not know it."""
        self._check_resource(resource)
        if not record_id:
            raise ValueError("record_id must not be empty")
        body = self._get_json(
            f"{resource}/{quote(record_id, safe='')}", None, what=f"GET /{resource}/{{id}}", allow_404=True
        )
        if body is None:
            return None
        if not isinstance(body, dict):
            raise SourceApiError(f"B GET /{resource}/{{id}}: the answer is not a JSON object")
        return body

    # --- internals -------------------------------------------------------------------------------

    def _window_pages(
        self,
        resource: str,
        since: datetime,
        end: str,
        *,
        page_size: int,
        include_deleted: bool,
        stats: _WindowStats,
    ) -> Iterator[list[dict[str, Any]]]:
        position = since  # updated_since of the current pass: moves only when a cursor expires
        cursor: str | None = None
        last_seen: datetime | None = None
        stalled = 0
        while True:
            params = {
                "updated_since": rfc3339(position),
                "updated_before": end,
                "include_deleted": "true" if include_deleted else "false",
                "limit": str(page_size),
            }
            if cursor is not None:
                params["cursor"] = cursor
            page_started = self._clock()
            try:
                body = self._get_json(resource, params, what=f"GET /{resource}", stats=stats)
            except _CursorExpiredError:
                if cursor is None:
                    raise
                resume = max(last_seen or position, position)
                stalled = stalled + 1 if resume == position else 0
                if stalled >= MAX_STALLED_RESUMES:
                    raise SourceApiError(
                        f"B {resource}: cursor expired {stalled} times in a row without progress "
                        f"at updated_since={rfc3339(position)}; paging is slower than B's cursor lifetime"
                    ) from None
                stats.resumes += 1
                log.info(
                    "B %s: cursor expired after %d pages, resuming from updated_since=%s",
                    resource, stats.pages, rfc3339(resume),
                )  # fmt: skip
                position, cursor = resume, None
                continue
            page, next_cursor = self._page_of(body, resource)
            stats.pages += 1
            stats.records += len(page)
            log.debug(
                "B %s: page %d, %d records, %.3f s, last page: %s",
                resource, stats.pages, len(page), self._clock() - page_started, next_cursor is None,
            )  # fmt: skip
            if page:
                # Only the last valid timestamp matters: it is where a resume would start. A record
                # whose updated_at does not parse is the parser's to quarantine, not a reason to stop.
                last_seen = self._last_updated_at(page) or last_seen
                yield page
            if next_cursor is None:
                return
            if next_cursor == cursor and not page:
                raise SourceApiError(f"B {resource}: an empty page pointed back to its own cursor")
            cursor = next_cursor

    @staticmethod
    def _check_resource(resource: str) -> None:
        if resource not in RESOURCE_NAMES:
            raise ValueError(f"unknown B resource {resource!r}; one of {sorted(RESOURCE_NAMES)}")

    @staticmethod
    def _page_of(body: Any, resource: str) -> tuple[list[dict[str, Any]], str | None]:
        if not isinstance(body, dict) or "data" not in body or "next_cursor" not in body:
            raise SourceApiError(f"B GET /{resource}: a page must be an object with data and next_cursor")
        data, next_cursor = body["data"], body["next_cursor"]
        if not isinstance(data, list) or not all(map(isinstance, data, repeat(dict))):  # map: no Python loop
            raise SourceApiError(f"B GET /{resource}: data is not a list of objects")
        if next_cursor is not None and (not isinstance(next_cursor, str) or not next_cursor):
            raise SourceApiError(f"B GET /{resource}: next_cursor is neither a string nor null")
        return data, next_cursor

    @staticmethod
    def _last_updated_at(page: list[dict[str, Any]]) -> datetime | None:
        for record in reversed(page):
            try:
                return parse_timestamp(record.get("updated_at"))
            except ValueError:
                continue
        return None

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): half fixed, half random."""
        ceiling = min(self._max_backoff, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _get_json(
        self,
        path: str,
        params: dict[str, str] | None,
        *,
        what: str,
        stats: _WindowStats | None = None,
        allow_404: bool = False,
    ) -> Any:
        """GET ``base_url/path`` with retries; the decoded JSON, or None for a 404 if ``allow_404``."""
        url = f"{self._base_url}/{path}"
        problem = ""
        for attempt in range(1, self._max_attempts + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            retry_after: float | None = None
            try:
                response = self._session.get(
                    url, params=params, headers=self._headers, timeout=self._timeout, allow_redirects=False
                )
            except _TRANSIENT_ERRORS as exc:
                problem = type(exc).__name__
            except requests.RequestException as exc:
                raise SourceApiError(f"B {what}: request failed: {type(exc).__name__}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._json_of(response, what)
                if status == 404 and allow_404:
                    return None
                if status >= 500 or status == 429:
                    code, _ = _error_of(response)
                    problem = f"HTTP {status} ({code})"
                    if status == 429:
                        retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                else:
                    self._raise_for(status, response, what)
            if attempt == self._max_attempts:
                break
            delay = min(retry_after, self._max_backoff) if retry_after is not None else self._backoff(attempt)
            if stats is not None:
                stats.retries += 1
            log.warning(
                "B %s: %s on attempt %d of %d, retrying in %.1f s",
                what, problem, attempt, self._max_attempts, delay,
            )  # fmt: skip
            self._sleep(delay)
        raise SourceUnavailableError(
            f"B {what}: still failing after {self._max_attempts} attempts (last: {problem}); "
            f"B is down or overloaded, the task's retry will try again later"
        )

    @staticmethod
    def _raise_for(status: int, response: requests.Response, what: str) -> NoReturn:
        if status in (401, 403):
            raise SourceApiError(
                f"B {what}: HTTP {status}, B refused the API key; check the password of the source's API connection"
            )
        if 300 <= status < 400:
            raise SourceApiError(
                f"B {what}: HTTP {status} redirect, not followed (the API key is only sent to the "
                f"configured base URL); check the connection's host and base path"
            )
        code, message = _error_of(response)
        if status == 400 and code == "cursor_expired":
            raise _CursorExpiredError(f"B {what}: cursor expired")
        raise SourceApiError(f"B {what}: HTTP {status} {code}: {message}")

    @staticmethod
    def _json_of(response: requests.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise SourceApiError(
                f"B {what}: HTTP {response.status_code} but the body is not JSON "
                f"({_truncate(response.headers.get('Content-Type', 'no content type'), 64)})"
            ) from None
