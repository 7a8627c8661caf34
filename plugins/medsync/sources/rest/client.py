"""HTTP transport of protocol ``rest``: :class:`RestClient`, driven by a source's ``api:`` section.

It pages through one level's changes in a time window (five paging styles), follows the source's
deletion feed, reads live counts, and handles what a REST contract asks of a client: retries with
jittered backoff on transient failures, ``Retry-After`` (seconds or an HTTP date judged against the
response's ``Date``), restarting a window after an expired cursor or snapshot, a request rate
limit, redirects never followed, and never revealing the secret.

No Airflow import here: :mod:`medsync.sources.rest.hook` builds this client from an Airflow
connection, and tests build it directly. Records are passed on as the source sent them (JSON
decoded): validating them is the parser's job (``records``), so the client does no per-record work
beyond C-speed checks of a page's shape.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from itertools import repeat
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

import msgspec
import requests
import tenacity
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from medsync.config import LEVELS
from medsync.errors import ConfigError, RunParamsError, SourceApiError, SourceUnavailableError
from medsync.sources.base import RawPage, RequestLimiter, SourceClient
from medsync.sources.rate_limit import TokenBucket
from medsync.sources.rest.spec import (
    BasicAuth,
    BearerAuth,
    CursorPaging,
    FeedDeletions,
    HeaderAuth,
    LastRecordPaging,
    LinkHeaderPaging,
    NextLinkPaging,
    OffsetPaging,
    Order,
    PageNumberPaging,
    Paging,
    RestApi,
    TimeFormat,
    VersionSpec,
    WindowSpec,
    path_keys,
)

log = logging.getLogger(__name__)

MAX_CONNECT_TIMEOUT_SECONDS = 10.0
"""A host that does not accept a TCP connection in this long is down; reads get the full timeout."""

BACKOFF_BASE_SECONDS = 1.0
"""First retry waits 0.5-1 s, then 1-2 s, 2-4 s, ... (capped at ``max_backoff_seconds``)."""

MAX_STALLED_RESTARTS = 3
"""Expiries (cursor, snapshot) in a row without any progress before a window gives up."""

_ERROR_TEXT_MAX_CHARS = 200

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_MISSING: Any = object()

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


# --- keeping the secret out of http.client's debug output ------------------------------------------
# http.client prints every header it sends (print(), not logging) when HTTPConnection.debuglevel > 0,
# which is how requests' documentation suggests debugging. The connections of our own sessions
# ignore that switch, so turning it on for some other library cannot print a source's secret.


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
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _quieten(manager)
        return manager


def new_session(base_url: str, *, netrc: bool = True) -> requests.Session:
    """A session for ``base_url`` whose environment settings are read once, here.

    requests reads the environment (proxies, ``NO_PROXY``, CA bundle, ``.netrc``) again for
    every request when ``trust_env`` is on: about a millisecond a page in a worker's large
    environment, a tenth of a pull's CPU. This session resolves them for the URL now, as
    requests would, and then stops looking. ``netrc`` false: no ``.netrc`` credentials (they
    would replace an ``Authorization`` header the client sets itself).
    """
    session = requests.Session()
    adapter = _QuietAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.auth = requests.utils.get_netrc_auth(base_url) if netrc else None
    session.trust_env = False
    return session


# --- moments and JSON paths ------------------------------------------------------------------------


_UNITS: dict[str, timedelta] = {"epoch_seconds": timedelta(seconds=1), "epoch_millis": timedelta(milliseconds=1)}


def format_moment(moment: datetime, form: TimeFormat, *, round_up: bool = False) -> str:
    """``moment`` as a query parameter: RFC 3339 in UTC with microseconds
    (``2026-11-19T00:00:00.000000Z``) or integer epoch seconds/milliseconds, rounded down (a
    window's start) or up (``round_up``: its exclusive end), so that nothing in the window is missed.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a naive datetime is ambiguous; pass an aware one (e.g. tzinfo=UTC)")
    if form == "rfc3339":
        # isoformat, not strftime: glibc's %Y does not pad year 1 (the start of a whole-time-line listing).
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    unit = _UNITS[form]
    return str(-((_EPOCH - moment) // unit) if round_up else (moment - _EPOCH) // unit)


def parse_moment(value: object, form: TimeFormat) -> datetime:
    """A version as the source writes it (``form``), as an aware datetime; ``ValueError`` otherwise.

    RFC 3339: any offset, 0-6 fractional digits, an offset required. Epoch forms: a JSON integer.
    """
    if form == "rfc3339":
        if not isinstance(value, str):
            raise ValueError("not a string")
        parsed = datetime.fromisoformat(value.strip().upper())  # RFC 3339 allows a lowercase 't'/'z'
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError("no UTC offset")
        return parsed
    if type(value) is not int:
        raise ValueError("not an integer")
    try:
        return _EPOCH + value * _UNITS[form]
    except OverflowError:
        raise ValueError("out of range") from None


def json_getter(path: str | None) -> Callable[[Any], Any]:
    """A function reading dotted ``path`` (``error.code``, ``@odata\\.nextLink``) from decoded JSON;
    ``_MISSING`` when absent.

    ``None`` reads the value itself.
    """
    if path is None:
        return lambda value: value
    keys = path_keys(path)
    if len(keys) == 1:
        key = keys[0]
        return lambda value: value.get(key, _MISSING) if type(value) is dict else _MISSING

    def get(value: Any) -> Any:
        for key in keys:
            if type(value) is not dict:
                return _MISSING
            value = value.get(key, _MISSING)
        return value

    return get


_decode_json = msgspec.json.Decoder().decode


def parse_json(body: bytes) -> Any:
    """A JSON body as Python values, exactly as ``json.loads`` reads it.

    msgspec parses a page of records in about 40% of ``json.loads``'s time (a good part of a
    pull's CPU). What it refuses (UTF-16 or UTF-32, ``NaN``, integers beyond 64 bits, invalid
    JSON) goes to ``json.loads``, which reads the bytes itself, so the rules and errors stay the
    standard library's.
    """
    try:
        return _decode_json(body)
    except msgspec.DecodeError:
        return json.loads(body)


def _truncate(text: str, limit: int = _ERROR_TEXT_MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _next_link(header: str | None) -> str | None:
    """The URL of the RFC 8288 ``Link`` header's ``rel="next"`` entry (rel may list several types)."""
    if not header:
        return None
    for link in requests.utils.parse_header_links(header):
        if "next" in link.get("rel", "").lower().split():
            return link.get("url") or None
    return None


def _window_params(window: WindowSpec, since: datetime, until: datetime) -> dict[str, str]:
    """The query parameters that bound a request to ``[since, until)``, as ``window`` says them."""
    start = format_moment(since, window.format)
    end = format_moment(until, window.format, round_up=True)
    params: dict[str, str] = {}
    if window.since_param is not None:
        params[window.since_param] = start
    if window.until_param is not None:
        params[window.until_param] = end
    for param, template in window.templates.items():
        params[param] = template.format(since=start, until=end)
    return params


def _since_name(window: WindowSpec) -> str:
    """How messages name the lower bound: its parameter, or ``since`` when a template carries it."""
    return window.since_param or "since"


# --- the client ------------------------------------------------------------------------------------


class _TransientError(SourceUnavailableError):
    """One failed attempt that may succeed later; ``retry_after``: the source's ``Retry-After``."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.retry_after = retry_after


class _ExpiredError(SourceApiError):
    """The source said the cursor or snapshot expired: the window restarts without it."""


@dataclass
class _Stats:
    pages: int = 0
    records: int = 0
    retries: int = 0
    restarts: int = 0


class _PageState:
    """Where a pass is: the next request's URL and parameters, and the paging counters."""

    __slots__ = ("offset", "page_number", "pages", "params", "url")

    def __init__(self, url: str, params: dict[str, str], page_size: int, paging: Paging) -> None:
        self.url = url
        self.params: dict[str, str] | None = params
        self.pages = 0
        self.offset = 0
        self.page_number = paging.start if isinstance(paging, PageNumberPaging) else 0
        if isinstance(paging, OffsetPaging):
            params[paging.offset_param] = "0"
        elif isinstance(paging, PageNumberPaging):
            params[paging.page_param] = str(self.page_number)


@dataclass(frozen=True)
class _Listing:
    """One list endpoint compiled from the spec: where, which parameters, how to page and read it."""

    label: str
    """``GET /patients``, for messages."""
    url: str
    params: dict[str, str]
    window: WindowSpec
    sends_until: bool
    """The upper bound is in the request; else the client drops records at or after it."""
    sorted_by_version: bool
    """``order: version_ascending``: restarts resume at the last version, an unbounded listing stops at ``until``."""
    paging: Paging
    page_size_param: str | None
    records: Callable[[Any], Any]
    records_path: str | None
    records_optional: bool
    """An empty page may leave ``records_path`` out (``empty_page_omits_records``)."""
    version: Callable[[Any], Any]
    version_format: TimeFormat
    next_value: Callable[[Any], Any] | None
    """The cursor, next link, total, total pages or has-more flag read from the body, per paging type."""
    absent_ends: bool
    """An absent cursor or next link means the last page (``absent_on_last_page``)."""
    last_record_cursor: Callable[[Any], Any] | None
    """``last_record`` paging: reads the next page's cursor from a page's last record."""
    last_record_cursor_path: str | None


class RestClient(SourceClient):
    """Client of one REST source at ``base_url``, as its ``api:`` section (``api``) describes it.

    Every request carries the secret as ``api.auth`` says (a header, a bearer token, or basic auth
    with ``login``), a (connect, read) timeout of (``min(timeout, 10)``, ``timeout``) seconds, and
    first waits for ``limiter`` (or, without one, a token bucket of ``rate_limit_per_second``;
    None: no limit). Threads may share a limiter, not a client.

    Each request is tried at most ``max_attempts`` times. ``api.limits.retry_statuses`` (default
    429 and every 5xx), connection errors, dropped connections and timeouts are retried after an
    exponential backoff with jitter (0.5-1 s, 1-2 s, 2-4 s, ... never more than
    ``max_backoff_seconds``); a 429 or 503 with ``Retry-After`` waits that long instead (capped at
    ``max_backoff_seconds``) and counts as an attempt. Past the budget the client raises
    ``SourceUnavailableError``. A refused secret (401/403) raises ``SourceApiError`` at once, as
    does any other 4xx (with the source's error code and message, truncated), a redirect (never
    followed, so the secret goes nowhere else), a next link to another host, or a body that is not
    the JSON the spec describes.

    Logs (``medsync.sources.rest.client``): DEBUG per page, INFO per window, WARNING per retry.
    They name levels, endpoints, windows, counts and HTTP statuses only: never the secret, the
    headers, or record contents.

    ``sleep``, ``clock`` (monotonic seconds), ``now`` (wall clock, for ``Retry-After`` dates from a
    response without ``Date``) and ``rng`` are there so tests need not wait. When ``session`` is
    given the caller owns it; otherwise the client makes one whose connections never print their
    headers, and :meth:`close` (or ``with``) closes it.
    """

    def __init__(
        self,
        base_url: str,
        api: RestApi,
        secret: str,
        *,
        login: str | None = None,
        page_size: int,
        timeout: float,
        max_attempts: int,
        max_backoff_seconds: float,
        limiter: RequestLimiter | None = None,
        rate_limit_per_second: float | None = None,
        name: str = "source",
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self._name = name
        self._base_url = self._checked_base_url(base_url)
        self._origin = self._origin_of(self._base_url)
        self._api = api
        largest = api.limits.max_page_size
        if not 1 <= page_size <= (largest or page_size):
            raise ConfigError(f"{name}: page_size must be 1..{largest or 'any'}, got {page_size}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive, got {timeout!r}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts!r}")
        if not max_backoff_seconds > 0:
            raise ConfigError(f"max_backoff_seconds must be positive, got {max_backoff_seconds!r}")
        self._page_size = page_size
        self._headers = {"Accept": "application/json", "User-Agent": "medsync", **self._auth_headers(secret, login)}
        self._timeout = (min(float(timeout), MAX_CONNECT_TIMEOUT_SECONDS), float(timeout))
        self._max_attempts = int(max_attempts)
        self._max_backoff = float(max_backoff_seconds)
        self._retry_statuses = api.limits.retried
        self._sleep = sleep
        self._clock = clock
        self._now = now
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._own_rate = rate_limit_per_second if limiter is None else None
        if limiter is None and rate_limit_per_second is not None:
            limiter = TokenBucket(rate_limit_per_second, clock=clock, sleep=sleep)
        self._limiter = limiter
        self._owns_session = session is None
        self._session = (
            session if session is not None else new_session(self._base_url, netrc=isinstance(api.auth, HeaderAuth))
        )
        self._retrying = tenacity.Retrying(
            sleep=sleep,
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_TransientError),
            before_sleep=self._before_sleep,
        )
        self._error_code = json_getter(api.expired.code_path if api.expired and api.expired.code_path else "error.code")
        self._error_message = json_getter("error.message")
        self._listings = {level: self._listing_of(level) for level in LEVELS}
        self._feed = self._feed_listing()

    # --- construction ------------------------------------------------------------------------------

    def _checked_base_url(self, base_url: str) -> str:
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{self._name}: the base URL must be http(s)://host[:port]/path, got {base_url!r}")
        if parts.username or parts.password:
            raise ConfigError(f"{self._name}: the base URL must not carry credentials; the secret goes in the password")
        if parts.query or parts.fragment:
            raise ConfigError(f"{self._name}: the base URL must not have a query or fragment, got {base_url!r}")
        return base_url.strip().rstrip("/")

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        default = 443 if parts.scheme == "https" else 80
        return parts.scheme, (parts.hostname or "").lower(), parts.port or default

    def _auth_headers(self, secret: str, login: str | None) -> dict[str, str]:
        # Neither value is ever repeated, not even in these messages.
        if not isinstance(secret, str) or not secret or not all(33 <= ord(c) <= 126 for c in secret):
            raise ConfigError(
                f"{self._name}: the secret (the connection's password) is empty or contains whitespace "
                f"or non-ASCII characters"
            )
        auth = self._api.auth
        if isinstance(auth, HeaderAuth):
            return {auth.header: secret}
        if isinstance(auth, BearerAuth):
            return {"Authorization": f"Bearer {secret}"}
        assert isinstance(auth, BasicAuth)
        if not login or ":" in login or not all(32 <= ord(c) <= 126 for c in login):
            raise ConfigError(f"{self._name}: basic auth needs the connection's login: printable ASCII without ':'")
        token = base64.b64encode(f"{login}:{secret}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    def _listing(
        self,
        *,
        label: str,
        endpoint: str,
        params: dict[str, str],
        window: WindowSpec,
        order: Order,
        paging: Paging,
        records_path: str | None,
        records_optional: bool,
        key_path: str,
        version: VersionSpec,
    ) -> _Listing:
        next_path: str | None
        last_record_path: str | None = None
        absent_ends = False
        if isinstance(paging, OffsetPaging):
            page_size_param: str | None = paging.limit_param
            next_path = paging.total_path
        else:
            page_size_param = paging.page_size_param
            if isinstance(paging, CursorPaging):
                next_path, absent_ends = paging.cursor_path, paging.absent_on_last_page
            elif isinstance(paging, NextLinkPaging):
                next_path, absent_ends = paging.next_path, paging.absent_on_last_page
            elif isinstance(paging, PageNumberPaging):
                next_path = paging.total_pages_path
            elif isinstance(paging, LastRecordPaging):
                next_path = paging.has_more_path
                last_record_path = paging.cursor_path or key_path
            else:
                next_path = None  # a Link header: nothing to read from the body
        return _Listing(
            label=label,
            url=self._base_url + endpoint,
            params=dict(params),
            window=window,
            sends_until=window.sends("until"),
            sorted_by_version=order == "version_ascending",
            paging=paging,
            page_size_param=page_size_param,
            records=json_getter(records_path),
            records_path=records_path,
            records_optional=records_optional,
            version=json_getter(version.path),
            version_format=version.format,
            next_value=json_getter(next_path) if next_path is not None else None,
            absent_ends=absent_ends,
            last_record_cursor=json_getter(last_record_path) if last_record_path is not None else None,
            last_record_cursor_path=last_record_path,
        )

    def _listing_of(self, level: str) -> _Listing:
        api = self._api
        endpoint = api.levels[level].endpoint
        return self._listing(
            label=f"{self._name} GET {endpoint}",
            endpoint=endpoint,
            params=api.level_params(level),
            window=api.level_window(level),
            order=api.level_order(level),
            paging=api.paging,
            records_path=api.level_records_path(level),
            records_optional=api.empty_page_omits_records,
            key_path=api.level_key(level).path,
            version=api.level_version(level),
        )

    def _feed_listing(self) -> _Listing | None:
        api = self._api
        feed = api.deletions
        if not isinstance(feed, FeedDeletions):
            return None
        return self._listing(
            label=f"{self._name} GET {feed.endpoint}",
            endpoint=feed.endpoint,
            params=feed.params,
            window=api.feed_window(),
            order=feed.order,
            paging=feed.paging or api.paging,
            records_path=api.feed_records_path(),
            records_optional=api.feed_omits_records(),
            key_path=feed.key.path,
            version=feed.version,
        )

    # --- properties --------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"RestClient(name={self._name!r}, base_url={self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The API's root, without a trailing slash."""
        return self._base_url

    @property
    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeout of every request, in seconds."""
        return self._timeout

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def max_attempts(self) -> int:
        return self._max_attempts

    @property
    def max_backoff_seconds(self) -> float:
        return self._max_backoff

    @property
    def limiter(self) -> RequestLimiter | None:
        return self._limiter

    @property
    def rate_limit_per_second(self) -> float | None:
        """The own token bucket's rate; None without a limit or with a limiter from outside."""
        return float(self._own_rate) if self._own_rate is not None else None

    def close(self) -> None:
        """Closes the session if the client made it."""
        if self._owns_session:
            self._session.close()

    # --- public calls ------------------------------------------------------------------------------

    def iter_pages(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        """Records of ``level`` with ``since <= version < until``, one page at a time.

        ``since`` and ``until`` must be aware datetimes: the lower bound is always sent, so no
        request is ever open-ended; ``since == until`` yields nothing without asking. Pages come in
        the source's order as its raw items; empty pages are not yielded. With a deletion feed, the
        feed's items of ``level`` in the same window follow as ``RawPage(items, deletions=True)``.

        When the source says the cursor or snapshot expired, the window restarts from the last
        version received (inclusive) or, for a listing not declared sorted, from its start, so
        some records are yielded twice; a record may also appear twice because it changed during
        paging. Callers keep the newest version of each key.

        Raises ``ConfigError`` for an unknown level, ``RunParamsError`` for a naive or reversed
        window (both permanent: asking again cannot help), ``SourceApiError`` /
        ``SourceUnavailableError`` as described on the class.
        """
        if not self._asks(level, since, until):
            return
        for items in self._logged_window(self._listings[level], level, since, until):
            yield RawPage(items)
        for page in self.iter_deletions(level, since, until):
            if page.items:
                yield page

    def iter_deletions(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        """The deletion feed's items of ``level`` in ``[since, until)``, a ``RawPage(deletions=True)``
        per page of the feed that has items, of this level or not (``others`` counts the rest).
        Nothing without a feed."""
        feed = self._feed
        if feed is None or not self._asks(level, since, until):
            return
        deletions = self._api.feed()
        resource = deletions.resources[level]
        resource_of = json_getter(deletions.resource_path)
        for items in self._logged_window(feed, f"{level} deletions", since, until):
            # Items of every resource come in one feed: the other levels read theirs themselves.
            mine = [item for item in items if resource_of(item) == resource]
            yield RawPage(mine, deletions=True, others=len(items) - len(mine))

    def _asks(self, level: str, since: datetime, until: datetime) -> bool:
        """Whether ``[since, until)`` of ``level`` is worth a request; ValueError for arguments out of bounds."""
        if level not in self._listings:
            raise ConfigError(f"unknown level {level!r}; levels are {', '.join(LEVELS)}")
        if since.utcoffset() is None or until.utcoffset() is None:
            raise RunParamsError("a naive datetime is ambiguous as a window bound; pass an aware one (e.g. tzinfo=UTC)")
        if since > until:
            raise RunParamsError(f"window starts after it ends: [{since.isoformat()}, {until.isoformat()})")
        if since == until:
            log.debug("%s %s: empty window at %s, nothing to ask", self._name, level, since.isoformat())
            return False
        return True

    def counts(self) -> dict[str, int] | None:
        """Live records per level now (``{"subject": n, ...}``), or None when the spec has no counts."""
        spec = self._api.counts
        if spec is None:
            return None
        what = f"{self._name} GET {spec.endpoint}"
        body = self._json_of(self._get(self._base_url + spec.endpoint, None, what=what), what)
        result: dict[str, int] = {}
        for level in LEVELS:
            path = spec.paths[level]
            value = json_getter(path)(body)
            if type(value) is not int or value < 0:
                raise SourceApiError(f"{what}: {path!r} is missing or not a count")
            result[level] = value
        return result

    # --- windows and pages -------------------------------------------------------------------------

    def _logged_window(self, listing: _Listing, what: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        stats = _Stats()
        started = self._clock()
        outcome = "stopped early"
        start, end = since.astimezone(UTC).isoformat(), until.astimezone(UTC).isoformat()
        try:
            yield from self._window(listing, since, until, stats)
            outcome = "done"
        except GeneratorExit:
            raise  # the caller stopped iterating: not a failure
        except BaseException:
            outcome = "failed"
            raise
        finally:
            log.info(
                "%s %s window [%s, %s) %s: %d pages, %d records, %.1f s, %d retries, %d restarts",
                self._name, what, start, end, outcome, stats.pages, stats.records,
                self._clock() - started, stats.retries, stats.restarts,
            )  # fmt: skip

    def _window(self, listing: _Listing, since: datetime, until: datetime, stats: _Stats) -> Iterator[list[Any]]:
        position = since  # the lower bound of the current pass: moves only when paging state expires
        stalled = 0
        furthest = 0  # unsorted listings: the most pages a pass read before its paging expired
        while True:
            last_seen: datetime | None = None
            pages_before = stats.pages
            try:
                for items in self._pass(listing, position, until, stats):
                    if listing.sorted_by_version:
                        # Only the last valid version matters: it is where a restart would start. A record
                        # whose version does not parse is the parser's to quarantine, not a reason to stop.
                        last_seen = self._in_order(items, listing, last_seen)
                    yield items
                return
            except _ExpiredError:
                if listing.sorted_by_version:
                    resume = max(last_seen or position, position)
                    progress = resume > position
                else:
                    # Nothing says where the records read so far end: only the window's start is safe.
                    resume = since
                    progress = stats.pages - pages_before > furthest
                    furthest = max(furthest, stats.pages - pages_before)
                stalled = 0 if progress else stalled + 1
                if stalled >= MAX_STALLED_RESTARTS:
                    raise SourceApiError(self._stalled_message(listing, stalled, position, furthest)) from None
                stats.restarts += 1
                log.info(
                    "%s: paging expired after %d pages, restarting from %s=%s",
                    listing.label, stats.pages, _since_name(listing.window),
                    format_moment(resume, listing.window.format),
                )  # fmt: skip
                position = resume

    @staticmethod
    def _stalled_message(listing: _Listing, stalled: int, position: datetime, furthest: int) -> str:
        window = listing.window
        if listing.sorted_by_version:
            return (
                f"{listing.label}: paging expired {stalled} times in a row without progress at "
                f"{_since_name(window)}={format_moment(position, window.format)}; "
                f"paging is slower than the source's cursor lifetime"
            )
        return (
            f"{listing.label}: paging expired {stalled} times in a row, each pass from the window's start "
            f"getting no further than {furthest} pages; the listing is not declared sorted by version "
            f"(order: version_ascending), so a restart cannot resume where paging stopped: declare the "
            f"order if the source sorts by version, or sync shorter windows"
        )

    def _in_order(self, items: list[Any], listing: _Listing, previous: datetime | None) -> datetime | None:
        """The page's last valid version (else ``previous``); SourceApiError when the page starts
        before ``previous``: the listing is not sorted as ``order: version_ascending`` declares, and
        a restart from the last version would skip records."""
        if previous is not None:
            get, form = listing.version, listing.version_format
            for item in items:
                try:
                    first = parse_moment(get(item), form)
                except ValueError:
                    continue
                if first < previous:
                    raise SourceApiError(
                        f"{listing.label}: a page starts at an older version than the previous page ended; "
                        f"the listing is not sorted by version as order: version_ascending declares "
                        f"(remove it: expired paging then restarts from the window's start)"
                    )
                break
        return self._last_version(items, listing) or previous

    def _pass(self, listing: _Listing, position: datetime, until: datetime, stats: _Stats) -> Iterator[list[Any]]:
        """One pass over the window from ``position``: pages until the last, or until paging expires.

        Without an upper bound in the request, records at or after ``until`` are dropped here, and a
        listing sorted by version ends with the first page that reaches ``until``.
        """
        params = {**listing.params, **_window_params(listing.window, position, until)}
        if listing.page_size_param is not None:
            params[listing.page_size_param] = str(self._page_size)
        state = _PageState(listing.url, params, self._page_size, listing.paging)
        while True:
            page_started = self._clock()
            try:
                response = self._get(state.url, state.params, what=listing.label, stats=stats)
            except _ExpiredError as exc:
                if state.pages == 0:  # nothing to restart without: a fresh pass was refused
                    raise SourceApiError(str(exc)) from None
                raise
            body = self._json_of(response, listing.label)
            items = self._items_of(body, listing)
            kept, reached = (items, False) if listing.sends_until else self._before(items, listing, until)
            state.pages += 1
            stats.pages += 1
            stats.records += len(kept)
            log.debug(
                "%s: page %d, %d records, %.3f s", listing.label, stats.pages, len(kept), self._clock() - page_started
            )
            if kept:
                yield kept
            if reached and listing.sorted_by_version:
                return  # every later record is at or after until too
            if not self._advance(state, listing, response, body, items):
                return

    @staticmethod
    def _before(items: list[Any], listing: _Listing, until: datetime) -> tuple[list[Any], bool]:
        """The records before ``until`` (a version that does not parse is kept: the parser quarantines
        it), and whether any record reached ``until``."""
        get, form = listing.version, listing.version_format
        kept: list[Any] = []
        reached = False
        for item in items:
            try:
                if parse_moment(get(item), form) >= until:
                    reached = True
                    continue
            except ValueError:
                pass
            kept.append(item)
        return kept, reached

    def _advance(
        self, state: _PageState, listing: _Listing, response: requests.Response, body: Any, items: list[Any]
    ) -> bool:
        """Points ``state`` at the next page, per the paging type; False after the last page."""
        paging = listing.paging
        count = len(items)
        if isinstance(paging, NextLinkPaging | LinkHeaderPaging):
            return self._advance_by_link(state, listing, response, body, count)
        assert state.params is not None
        if isinstance(paging, CursorPaging):
            cursor = self._next_value(body, listing, "cursor")
            if cursor is None:
                return False
            if cursor == state.params.get(paging.cursor_param) and not count:
                raise SourceApiError(f"{listing.label}: an empty page pointed back to its own cursor")
            state.params[paging.cursor_param] = cursor
        elif isinstance(paging, LastRecordPaging):
            if not self._has_more(body, listing, paging.has_more_path) or not count:
                return False
            cursor = self._last_record_cursor(items[-1], listing)
            if cursor == state.params.get(paging.cursor_param):
                raise SourceApiError(f"{listing.label}: a page ended on the record it started after")
            state.params[paging.cursor_param] = cursor
        elif isinstance(paging, OffsetPaging):
            state.offset += count
            if count < self._page_size or self._reached(body, listing, state.offset):
                return False
            state.params[paging.offset_param] = str(state.offset)
        elif isinstance(paging, PageNumberPaging):
            if count < self._page_size or self._reached(body, listing, state.page_number - paging.start + 1):
                return False
            state.page_number += 1
            state.params[paging.page_param] = str(state.page_number)
        return True

    @staticmethod
    def _has_more(body: Any, listing: _Listing, path: str) -> bool:
        assert listing.next_value is not None
        more = listing.next_value(body)
        if type(more) is not bool:
            raise SourceApiError(f"{listing.label}: a page must be an object with {path} (true or false)")
        return more

    @staticmethod
    def _last_record_cursor(record: Any, listing: _Listing) -> str:
        assert listing.last_record_cursor is not None
        cursor = listing.last_record_cursor(record)
        if type(cursor) is int:
            return str(cursor)
        if type(cursor) is not str or not cursor:
            raise SourceApiError(
                f"{listing.label}: the page's last record has no {listing.last_record_cursor_path} to continue "
                f"after (a string or an integer)"
            )
        return cursor

    def _advance_by_link(
        self, state: _PageState, listing: _Listing, response: requests.Response, body: Any, count: int
    ) -> bool:
        if isinstance(listing.paging, NextLinkPaging):
            link = self._next_value(body, listing, "next link")
        else:
            link = _next_link(response.headers.get("Link"))
        if link is None:
            return False
        following = self._followed(urljoin(response.url or state.url, link), listing.label)
        if following == response.url and not count:
            raise SourceApiError(f"{listing.label}: an empty page linked back to itself")
        state.url, state.params = following, None  # the link carries every parameter, as given
        return True

    def _items_of(self, body: Any, listing: _Listing) -> list[Any]:
        items = listing.records(body)
        if items is _MISSING and listing.records_optional and type(body) is dict:
            return []  # an empty page without its records path (empty_page_omits_records)
        if type(items) is not list:
            where = f"an object with {listing.records_path}" if listing.records_path else "an array"
            raise SourceApiError(f"{listing.label}: a page must be {where} of objects")
        if not all(map(isinstance, items, repeat(dict))):  # map: no Python loop
            raise SourceApiError(f"{listing.label}: the page's records are not all objects")
        return items

    def _next_value(self, body: Any, listing: _Listing, what: str) -> str | None:
        """The cursor or next link in ``body``: None (or empty) on the last page; missing is an error
        unless the spec says the last page leaves it out."""
        assert listing.next_value is not None
        value = listing.next_value(body)
        if value is _MISSING:
            if listing.absent_ends and type(body) is dict:
                return None  # the last page leaves it out (absent_on_last_page)
            raise SourceApiError(f"{listing.label}: a page must be an object with the {what} (null on the last)")
        if value is None or value == "":
            return None
        if type(value) is int:
            return str(value)
        if type(value) is not str:
            raise SourceApiError(f"{listing.label}: the {what} is neither a string nor null")
        return value

    def _reached(self, body: Any, listing: _Listing, done: int) -> bool:
        """Whether ``done`` (records or pages so far) reaches the total the body announces, if any."""
        if listing.next_value is None:
            return False
        total = listing.next_value(body)
        if type(total) is not int:
            raise SourceApiError(f"{listing.label}: the page's total is missing or not an integer")
        return done >= total

    def _followed(self, url: str, what: str) -> str:
        """``url`` if it is on the base URL's host: the secret is only ever sent there."""
        try:
            origin = self._origin_of(url)
        except ValueError:  # a port that is not a number
            origin = None
        if origin != self._origin:
            raise SourceApiError(
                f"{what}: the next page's link points to another host or scheme, not followed "
                f"(the secret is only sent to the configured base URL)"
            )
        return url

    @staticmethod
    def _last_version(items: list[Any], listing: _Listing) -> datetime | None:
        get, form = listing.version, listing.version_format
        for item in reversed(items):
            try:
                return parse_moment(get(item), form)
            except ValueError:
                continue
        return None

    # --- one request -------------------------------------------------------------------------------

    def _get(
        self, url: str, params: dict[str, str] | None, *, what: str, stats: _Stats | None = None
    ) -> requests.Response:
        """GET ``url`` with retries: the 2xx response."""
        try:
            response: requests.Response = self._retrying(self._attempt, url, params, what=what, stats=stats)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            problem = last.problem if isinstance(last, _TransientError) else type(last).__name__
            raise SourceUnavailableError(
                f"{what}: still failing after {self._max_attempts} attempts (last: {problem}); "
                f"the source is down or overloaded, the task's retry will try again later"
            ) from None
        return response

    def _attempt(
        self, url: str, params: dict[str, str] | None, *, what: str, stats: _Stats | None
    ) -> requests.Response:
        if self._limiter is not None:
            self._limiter.acquire()
        try:
            response = self._session.get(
                url, params=params, headers=self._headers, timeout=self._timeout, allow_redirects=False
            )
        except _TRANSIENT_ERRORS as exc:
            raise _TransientError(type(exc).__name__) from None
        except requests.RequestException as exc:
            raise SourceApiError(f"{what}: request failed: {type(exc).__name__}") from None
        status = response.status_code
        if 200 <= status < 300:
            return response
        if status in self._retry_statuses:
            code, _ = self._error_of(response)
            retry_after = self._retry_after(response) if status in (429, 503) else None
            raise _TransientError(f"HTTP {status} ({code})", retry_after)
        self._raise_for(status, response, what)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _TransientError) and failure.retry_after is not None:
            return min(failure.retry_after, self._max_backoff)
        # Half fixed, half random: clients that failed together do not retry together.
        ceiling = min(self._max_backoff, BACKOFF_BASE_SECONDS * 2.0 ** (state.attempt_number - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        stats: _Stats | None = state.kwargs.get("stats")
        if stats is not None:
            stats.retries += 1
        failure = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "%s: %s on attempt %d of %d, retrying in %.1f s",
            state.kwargs.get("what"),
            failure.problem if isinstance(failure, _TransientError) else type(failure).__name__,
            state.attempt_number,
            self._max_attempts,
            state.next_action.sleep if state.next_action is not None else 0.0,
        )

    def _retry_after(self, response: requests.Response) -> float | None:
        """``Retry-After`` in seconds from now; None when absent or unreadable.

        Integer seconds, or an HTTP date (RFC 9110 allows either, so both are read whatever the
        source's contract says) judged against the response's own ``Date`` header, so the two
        machines' clocks need not agree.
        """
        value = (response.headers.get("Retry-After") or "").strip()
        if not value:
            return None
        if value.isdigit():
            return float(int(value))
        at = self._http_date(value)
        if at is None:
            return None
        sent = self._http_date(response.headers.get("Date") or "") or self._now()
        return max((at - sent).total_seconds(), 0.0)

    @staticmethod
    def _http_date(value: str) -> datetime | None:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

    def _error_of(self, response: requests.Response) -> tuple[str, str]:
        """The source's error code and message (``error.code``/``error.message``); placeholders otherwise."""
        try:
            body = json.loads(response.content)
        except ValueError:
            # Not the source's JSON (a proxy's HTML page, say): its text is not worth repeating.
            return "unknown", "response body is not the source's JSON error"
        code, message = self._error_code(body), self._error_message(body)
        if code is _MISSING or code is None:
            return "unknown", "response body is not the source's JSON error"
        return _truncate(str(code), 64), _truncate(str(message) if isinstance(message, str) else "")

    def _raise_for(self, status: int, response: requests.Response, what: str) -> NoReturn:
        if status in (401, 403):
            auth = self._api.auth
            secret = "API key" if isinstance(auth, HeaderAuth) else "token" if isinstance(auth, BearerAuth) else "login"
            raise SourceApiError(
                f"{what}: HTTP {status}, the source refused the {secret}; check the password"
                f"{' and login' if isinstance(auth, BasicAuth) else ''} of the source's API connection"
            )
        if 300 <= status < 400:
            raise SourceApiError(
                f"{what}: HTTP {status} redirect, not followed (the secret is only sent to the "
                f"configured base URL); check the connection's host and base path"
            )
        code, message = self._error_of(response)
        expired = self._api.expired
        if expired is not None and status == expired.status and (expired.code is None or code == expired.code):
            raise _ExpiredError(f"{what}: paging state expired (HTTP {status} {code})")
        raise SourceApiError(f"{what}: HTTP {status} {code}: {message}")

    @staticmethod
    def _json_of(response: requests.Response, what: str) -> Any:
        try:
            return parse_json(response.content)
        except ValueError:
            raise SourceApiError(
                f"{what}: HTTP {response.status_code} but the body is not JSON "
                f"({_truncate(response.headers.get('Content-Type', 'no content type'), 64)})"
            ) from None
