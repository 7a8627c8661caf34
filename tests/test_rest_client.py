"""RestClient and RestSourceHook against scripted stubs of B and C on 127.0.0.1 (real sockets).

Each test scripts the stub's replies, then checks what the client did: what it sent, what it
yielded or raised, how long it slept. The clients are configured from B's ``api:`` section
(``include/sources/b.yaml``) and C's (``tests/rest_examples.py``). Sleeping is injected, so
backoff and Retry-After tests take milliseconds; only the timeout test waits for real (briefly).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from medsync.config import SourceConfig
from medsync.errors import ConfigError, RunParamsError, SourceApiError, SourceUnavailableError
from medsync.sources import api_model, validate_api
from medsync.sources.base import RawPage
from medsync.sources.rate_limit import TokenBucket
from medsync.sources.rest.client import RestClient
from medsync.sources.rest.spec import RestApi
from tests.rest_examples import b_api, c_api

API_KEY = "sk-test-Zq8VwQ3xLp"
TOKEN = "c-token-Rk2mW8pQ"
SINCE = datetime(2026, 11, 19, 0, 0, tzinfo=UTC)
UNTIL = datetime(2026, 11, 19, 12, 0, tzinfo=UTC)
C_SINCE = datetime(2026, 11, 3, 0, 0, tzinfo=UTC)  # 1793664000000
C_UNTIL = datetime(2026, 11, 3, 1, 0, tzinfo=UTC)  # 1793667600000


def api_of(section: dict[str, Any]) -> RestApi:
    api = validate_api("rest", section, "test")
    assert isinstance(api, RestApi)
    return api


B_API = api_of(b_api())
C_API = api_of(c_api())


# --- the stub ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_query: str = ""


def page(records: list[dict[str, Any]], next_cursor: str | None) -> Reply:
    return Reply(body={"data": records, "next_cursor": next_cursor})


def error(status: int, code: str, message: str = "", **headers: str) -> Reply:
    return Reply(status=status, body={"error": {"code": code, "message": message}}, headers=headers)


def rec(n: int, updated_at: str = "2026-11-19T01:00:00Z") -> dict[str, Any]:
    return {
        "id": f"pat_{n:04d}",
        "updated_at": updated_at,
        "deleted": False,
        "name": {"family": "Hong", "given": "Gildong"},
        "mrn": "MRN-998877",
        "birth_date": "1970-01-02",
    }


def crec(n: int, modified: int = 1793664000000) -> dict[str, Any]:
    return {"uuid": f"00000000-0000-4000-8000-{n:012d}", "modified": modified, "display_name": "Kim, Minji"}


class Stub:
    """A source on a real socket. ``script``: replies in order, or a function of the request."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.script: list[Reply] | Callable[[Seen], Reply] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = dict(parse_qsl(parts.query, keep_blank_values=True))
                seen = Seen(parts.path, query, dict(self.headers), parts.query)
                reply = stub._reply_for(seen)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                body = json.dumps(reply.body).encode() if reply.body is not None else b""
                if "Date" in reply.headers:
                    self.send_response_only(reply.status)  # the scripted Date, not the stub's clock
                else:
                    self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a slow reply written to a client that timed out: expected

        self.server = Server(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for it, once per test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @classmethod
    @contextmanager
    def serving(cls) -> Iterator[Stub]:
        """A stub answering on its socket for the block."""
        stub = cls()
        stub.thread.start()
        try:
            yield stub
        finally:
            stub.server.shutdown()
            stub.server.server_close()

    def _reply_for(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            if callable(self.script):
                return self.script(seen)
            if not self.script:
                return error(599, "stub_script_exhausted")
            return self.script.pop(0)

    @property
    def root(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/api/v1"


@pytest.fixture
def stub() -> Iterator[Stub]:
    with Stub.serving() as s:
        yield s


class FakeTime:
    """An injected clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def make_client(stub: Stub, fake: FakeTime, **overrides: Any) -> RestClient:
    kwargs: dict[str, Any] = {
        "page_size": 10,
        "timeout": 5.0,
        "max_attempts": 4,
        "max_backoff_seconds": 30.0,
        "rate_limit_per_second": None,
        "sleep": fake.sleep,
        "clock": fake.clock,
        "name": "b",
    }
    kwargs.update(overrides)
    return RestClient(stub.base_url, B_API, API_KEY, **kwargs)


def make_c_client(stub: Stub, fake: FakeTime, api: RestApi = C_API, **overrides: Any) -> RestClient:
    kwargs: dict[str, Any] = {
        "page_size": 2,
        "timeout": 5.0,
        "max_attempts": 4,
        "max_backoff_seconds": 30.0,
        "sleep": fake.sleep,
        "clock": fake.clock,
        "name": "c",
    }
    kwargs.update(overrides)
    return RestClient(f"{stub.root}/v2", api, TOKEN, **kwargs)


def ids(pages: list[RawPage], key: str = "id") -> list[list[str]]:
    return [[r[key] for r in p.items] for p in pages]


# --- B: paging ------------------------------------------------------------------------------------


def test_pages_follow_the_cursor_until_null(stub: Stub, fake: FakeTime) -> None:
    stub.script = [page([rec(1), rec(2)], "c1"), page([rec(3)], "c2"), page([rec(4)], None)]
    with make_client(stub, fake, page_size=2) as client:
        pages = list(client.iter_pages("subject", SINCE, UNTIL))
    assert ids(pages) == [["pat_0001", "pat_0002"], ["pat_0003"], ["pat_0004"]]
    assert not any(p.deletions for p in pages)
    assert [s.query.get("cursor") for s in stub.requests] == [None, "c1", "c2"]
    assert {s.path for s in stub.requests} == {"/api/v1/patients"}
    assert fake.sleeps == []


def test_every_request_sends_both_bounds_in_utc_include_deleted_and_limit(stub: Stub, fake: FakeTime) -> None:
    seoul = timezone(timedelta(hours=9))
    since = datetime(2026, 11, 19, 9, 0, 0, 5, tzinfo=seoul)  # 00:00:00.000005 UTC
    until = datetime(2026, 11, 19, 21, 0, tzinfo=seoul)
    stub.script = [page([rec(1)], "c1"), page([], None)]
    with make_client(stub, fake, page_size=250) as client:
        assert len(list(client.iter_pages("instance", since, until))) == 1  # empty page skipped
    for seen in stub.requests:
        assert seen.path == "/api/v1/images"
        assert seen.query["updated_since"] == "2026-11-19T00:00:00.000005Z"
        assert seen.query["updated_before"] == "2026-11-19T12:00:00.000000Z"
        assert seen.query["include_deleted"] == "true"
        assert seen.query["limit"] == "250"
        assert seen.headers["X-API-Key"] == API_KEY


def test_window_arguments_are_checked_before_any_request(stub: Stub, fake: FakeTime) -> None:
    with make_client(stub, fake) as client:
        assert list(client.iter_pages("study", SINCE, SINCE)) == []
        with pytest.raises(RunParamsError, match="naive"):
            list(client.iter_pages("study", SINCE.replace(tzinfo=None), UNTIL))
        with pytest.raises(RunParamsError, match="after it ends"):
            list(client.iter_pages("study", UNTIL, SINCE))
        with pytest.raises(ConfigError, match="unknown level"):
            list(client.iter_pages("studies", SINCE, UNTIL))
    with pytest.raises(ConfigError, match="page_size"):
        make_client(stub, fake, page_size=1001)  # B's largest page is 1000 (api.limits.max_page_size)
    assert stub.requests == []


def test_a_listing_of_the_whole_time_line_still_sends_both_bounds(stub: Stub, fake: FakeTime) -> None:
    stub.script = [page([rec(1)], None)]
    with make_client(stub, fake) as client:
        assert len(list(client.iter_listing("subject"))) == 1
    assert stub.requests[0].query["updated_since"] == "0001-01-01T00:00:00.000000Z"
    assert stub.requests[0].query["updated_before"] == "9999-12-31T23:59:59.999999Z"


def test_expired_cursor_resumes_from_last_updated_at_received(stub: Stub, fake: FakeTime) -> None:
    stub.script = [
        page([rec(1, "2026-11-19T08:00:00+09:00"), rec(2, "2026-11-19T09:30:00.25+09:00")], "c1"),
        error(400, "cursor_expired", "cursor is older than one hour"),
        page([rec(2, "2026-11-19T09:30:00.25+09:00"), rec(3, "2026-11-19T01:00:00Z")], None),
    ]
    with make_client(stub, fake, page_size=2) as client:
        got = [r["id"] for p in client.iter_pages("subject", SINCE, UNTIL) for r in p.items]
    assert got == ["pat_0001", "pat_0002", "pat_0002", "pat_0003"]
    resumed = stub.requests[2]
    assert "cursor" not in resumed.query
    assert resumed.query["updated_since"] == "2026-11-19T00:30:00.250000Z"  # inclusive: pat_0002 again
    assert resumed.query["updated_before"] == "2026-11-19T12:00:00.000000Z"
    assert resumed.query["include_deleted"] == "true"


def test_a_record_with_a_bad_updated_at_is_passed_on_and_resume_uses_the_last_good_one(
    stub: Stub, fake: FakeTime
) -> None:
    # The parser quarantines the bad record; the client must neither stop nor resume from it.
    stub.script = [
        page([rec(1, "2026-11-19T02:00:00Z"), rec(2, "not a time")], "c1"),
        error(400, "cursor_expired"),
        page([rec(3, "2026-11-19T03:00:00Z")], None),
    ]
    with make_client(stub, fake, page_size=2) as client:
        got = [r["id"] for p in client.iter_pages("subject", SINCE, UNTIL) for r in p.items]
    assert got == ["pat_0001", "pat_0002", "pat_0003"]
    assert stub.requests[2].query["updated_since"] == "2026-11-19T02:00:00.000000Z"


def test_cursor_expiring_without_progress_gives_up(stub: Stub, fake: FakeTime) -> None:
    def script(seen: Seen) -> Reply:
        if "cursor" in seen.query:
            return error(400, "cursor_expired")
        return page([rec(1, "2026-11-19T00:00:00Z")], "c")

    stub.script = script
    with make_client(stub, fake, page_size=1) as client, pytest.raises(SourceApiError, match="without progress"):
        list(client.iter_pages("subject", SINCE, UNTIL))
    assert len(stub.requests) < 10


def test_an_expiry_on_a_fresh_pass_is_not_retried(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: error(400, "cursor_expired")
    with make_client(stub, fake) as client, pytest.raises(SourceApiError, match="expired"):
        list(client.iter_pages("subject", SINCE, UNTIL))
    assert len(stub.requests) == 1


def test_a_page_that_is_not_the_contracts_shape_fails(stub: Stub, fake: FakeTime) -> None:
    for body, expected in [
        ({"items": [], "next_cursor": None}, "an object with data of objects"),
        ({"data": [rec(1), "x"], "next_cursor": None}, "not all objects"),
        ({"data": [rec(1)]}, "with the cursor"),
        ({"data": [rec(1)], "next_cursor": ["x"]}, "neither a string nor null"),
    ]:
        stub.script = [Reply(body=body)]
        with make_client(stub, fake) as client, pytest.raises(SourceApiError, match=expected):
            list(client.iter_pages("subject", SINCE, UNTIL))


# --- retries ----------------------------------------------------------------------------------------


def test_5xx_is_retried_with_growing_jittered_backoff(stub: Stub, fake: FakeTime) -> None:
    stub.script = [error(503, "unavailable"), error(500, "internal"), error(501, "x"), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        pages = list(client.iter_pages("sequence", SINCE, UNTIL))
    assert len(pages) == 1
    assert len(stub.requests) == 4  # every 5xx is transient (B's contract)
    assert len(fake.sleeps) == 3
    assert 0.5 <= fake.sleeps[0] <= 1.0
    assert 1.0 <= fake.sleeps[1] <= 2.0
    assert 2.0 <= fake.sleeps[2] <= 4.0


def test_dropped_connection_is_retried(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(drop=True), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        pages = list(client.iter_pages("subject", SINCE, UNTIL))
    assert ids(pages) == [["pat_0001"]]
    assert len(stub.requests) == 2
    assert len(fake.sleeps) == 1


def test_429_waits_retry_after_seconds(stub: Stub, fake: FakeTime) -> None:
    stub.script = [error(429, "rate_limited", Retry_After="7"), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        assert len(list(client.iter_pages("subject", SINCE, UNTIL))) == 1
    assert fake.sleeps == [7.0]


def test_429_retry_after_is_capped_and_counts_as_an_attempt(stub: Stub, fake: FakeTime) -> None:
    stub.script = [error(429, "rate_limited", Retry_After="3600")] * 3
    with (
        make_client(stub, fake, max_attempts=3, max_backoff_seconds=20.0) as client,
        pytest.raises(SourceUnavailableError, match="429"),
    ):
        client.counts()
    assert fake.sleeps == [20.0, 20.0]
    assert len(stub.requests) == 3


def test_retry_budget_exhausted_raises_source_unavailable(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: error(503, "unavailable")
    with (
        make_client(stub, fake, max_attempts=4, max_backoff_seconds=1.5) as client,
        pytest.raises(SourceUnavailableError) as caught,
    ):
        list(client.iter_pages("study", SINCE, UNTIL))
    message = str(caught.value)
    assert "studies" in message and "503" in message and "4 attempts" in message
    assert len(stub.requests) == 4
    assert len(fake.sleeps) == 3 and all(0 < s <= 1.5 for s in fake.sleeps)


def test_slow_answer_times_out_and_is_retried(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(delay=2.0, body={"data": [rec(9)], "next_cursor": None}), page([rec(1)], None)]
    started = time.monotonic()
    with make_client(stub, fake, timeout=0.3) as client:
        pages = list(client.iter_pages("subject", SINCE, UNTIL))
    assert time.monotonic() - started < 1.5  # the client did not wait for the slow answer
    assert ids(pages) == [["pat_0001"]]
    assert len(stub.requests) == 2
    assert client.timeout == (0.3, 0.3)


# --- refusals ---------------------------------------------------------------------------------------


def test_401_fails_at_once_without_revealing_the_key(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: error(401, "unauthorized", "invalid API key")
    with make_client(stub, fake) as client, pytest.raises(SourceApiError) as caught:
        list(client.iter_pages("subject", SINCE, UNTIL))
    assert not isinstance(caught.value, SourceUnavailableError)
    assert "refused the API key" in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert len(stub.requests) == 1 and fake.sleeps == []
    assert stub.requests[0].headers["X-API-Key"] == API_KEY


def test_other_4xx_fails_at_once_with_bs_code_and_truncated_message(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: error(400, "invalid_parameter", "limit out of range " + "x" * 5000)
    with make_client(stub, fake) as client, pytest.raises(SourceApiError) as caught:
        client.counts()
    message = str(caught.value)
    assert "400" in message and "invalid_parameter" in message and "limit out of range" in message
    assert len(message) < 400
    assert len(stub.requests) == 1


def test_redirect_is_not_followed(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: Reply(status=302, headers={"Location": "http://127.0.0.1:1/elsewhere"})
    with make_client(stub, fake) as client, pytest.raises(SourceApiError, match="redirect"):
        client.counts()
    assert len(stub.requests) == 1


def test_counts_are_level_keyed(stub: Stub, fake: FakeTime) -> None:
    def script(seen: Seen) -> Reply:
        if seen.path == "/api/v1/counts":
            counts = {"patients": 3, "studies": 4, "series": 5, "images": 6}
            return Reply(body={**counts, "as_of": "2026-11-19T00:00:00Z"})
        return error(404, "not_found", "no such record")

    stub.script = script
    with make_client(stub, fake) as client:
        assert client.counts() == {"subject": 3, "study": 4, "sequence": 5, "instance": 6}
    stub.script = lambda seen: Reply(body={"patients": 3, "studies": -1, "series": 5, "images": 6})
    with make_client(stub, fake) as client, pytest.raises(SourceApiError, match="'studies' is missing or not a count"):
        client.counts()
    assert fake.sleeps == []


def test_api_key_with_whitespace_is_refused_without_echoing_it(stub: Stub, fake: FakeTime) -> None:
    with pytest.raises(ConfigError) as caught:
        RestClient(stub.base_url, B_API, "bad key\n", page_size=10, timeout=1, max_attempts=1, max_backoff_seconds=1)
    assert "bad key" not in str(caught.value)


# --- rate limiting ----------------------------------------------------------------------------------


def test_rate_limiter_spaces_requests(stub: Stub, fake: FakeTime) -> None:
    arrivals: list[float] = []

    def script(seen: Seen) -> Reply:
        arrivals.append(fake.now)
        return Reply(body={"patients": 0, "studies": 0, "series": 0, "images": 0, "as_of": "x"})

    stub.script = script
    with make_client(stub, fake, rate_limit_per_second=4.0) as client:
        for _ in range(5):
            client.counts()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gaps == pytest.approx([0.25] * 4)


def test_a_shared_limiter_paces_every_client_that_uses_it(stub: Stub, fake: FakeTime) -> None:
    arrivals: list[float] = []

    def script(seen: Seen) -> Reply:
        arrivals.append(fake.now)
        return Reply(body={"patients": 0, "studies": 0, "series": 0, "images": 0, "as_of": "x"})

    stub.script = script
    shared = TokenBucket(2.0, clock=fake.clock, sleep=fake.sleep)
    # The shared limit wins over a client's own rate.
    with (
        make_client(stub, fake, limiter=shared, rate_limit_per_second=100.0) as one,
        make_client(stub, fake, limiter=shared) as two,
    ):
        for _ in range(2):
            one.counts()
            two.counts()
        assert one.limiter is shared and one.rate_limit_per_second is None
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gaps == pytest.approx([0.5] * 3)


def test_token_bucket_is_thread_safe() -> None:
    bucket = TokenBucket(100.0)
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            bucket.acquire()
            with lock:
                times.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(times) == 20
    # 20 tokens at 100/s with a burst of 1: the 20th can come no sooner than 0.19 s after the first.
    assert max(times) - started >= 0.19 - 0.01


# --- no secrets or record contents in logs -------------------------------------------------------------


def test_key_and_record_contents_never_reach_logs_or_stdout(
    stub: Stub,
    fake: FakeTime,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What requests' docs suggest for debugging: http.client then prints every header it sends.
    monkeypatch.setattr(http.client.HTTPConnection, "debuglevel", 1)
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "urllib3.connectionpool", "requests", "medsync"):
        caplog.set_level(logging.DEBUG, logger=name)
    stub.script = [
        page([rec(1)], "c1"),
        error(503, "unavailable"),
        page([rec(2)], None),
        error(401, "unauthorized", "invalid API key"),
    ]
    with make_client(stub, fake, page_size=1) as client:
        assert len(list(client.iter_pages("subject", SINCE, UNTIL))) == 2
        with pytest.raises(SourceApiError):
            client.counts()
        assert API_KEY not in repr(client)
    out = capsys.readouterr()
    logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    assert any(r.name.startswith("urllib3") for r in caplog.records)  # debug logging really was on
    assert any(r.levelno == logging.INFO and "2 pages, 2 records" in r.getMessage() for r in caplog.records)
    for secret in (API_KEY, "Hong", "Gildong", "MRN-998877", "1970-01-02"):
        assert secret not in logged
        assert secret not in out.out and secret not in out.err


def test_the_token_never_reaches_logs_or_stdout(
    stub: Stub,
    fake: FakeTime,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http.client.HTTPConnection, "debuglevel", 1)
    caplog.set_level(logging.DEBUG)
    stub.script = [Reply(body=[crec(1)]), error(401, "unauthenticated")]
    with make_c_client(stub, fake) as client, pytest.raises(SourceApiError):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))  # the feed's request is refused
    out = capsys.readouterr()
    logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    for secret in (TOKEN, "Minji"):
        assert secret not in logged and secret not in out.out and secret not in out.err


# --- registry ---------------------------------------------------------------------------------------


def test_protocol_registry() -> None:
    assert api_model("rest") is RestApi
    with pytest.raises(ConfigError, match="unknown source protocol"):
        api_model("dicomweb_nope")


# --- C: bearer auth, Link-header paging, snapshots, HTTP-date Retry-After, the deletion feed ---------


NO_DELETIONS = Reply(body=[])
"""The deletion feed's one empty page: C's lists are followed by the feed."""


def link(stub: Stub, path: str, **query: str) -> dict[str, str]:
    return {"Link": f'<{stub.root}{path}?{urlencode(query)}>; rel="next"'}


def test_bearer_auth_and_a_refused_token(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(body=[]), NO_DELETIONS, error(401, "unauthenticated", "revoked token")]
    with make_c_client(stub, fake) as client:
        assert list(client.iter_pages("subject", C_SINCE, C_UNTIL)) == []
        with pytest.raises(SourceApiError, match="refused the token") as caught:
            list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    assert TOKEN not in str(caught.value)
    assert stub.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert "X-API-Key" not in stub.requests[0].headers


def test_link_header_paging_follows_absolute_and_relative_links_as_given(stub: Stub, fake: FakeTime) -> None:
    window = {"modified_from": "1793664000000", "modified_to": "1793667600000", "page_size": "2"}
    stub.script = [
        Reply(body=[crec(1), crec(2)], headers=link(stub, "/v2/files", **window, page="2", snapshot="s1")),
        # A relative link, with other rels beside it: resolved against the request's URL.
        Reply(
            body=[crec(3), crec(4)],
            headers={"Link": '<https://elsewhere.example/v2/x>; rel="prev", <files?page=3&snapshot=s1>; rel="next"'},
        ),
        Reply(body=[crec(5)], headers={"X-Total-Count": "5"}),  # no next link: the last page
        NO_DELETIONS,
    ]
    with make_c_client(stub, fake) as client:
        pages = list(client.iter_pages("instance", C_SINCE, C_UNTIL))
    assert [len(p.items) for p in pages[:3]] == [2, 2, 1]
    assert [s.path for s in stub.requests[:3]] == ["/v2/files"] * 3
    assert stub.requests[0].query == window  # the first request: the window, in epoch milliseconds
    assert stub.requests[1].query == {**window, "page": "2", "snapshot": "s1"}  # the link as given
    assert stub.requests[2].raw_query == "page=3&snapshot=s1"  # nothing added to a link
    assert all(s.headers["Authorization"] == f"Bearer {TOKEN}" for s in stub.requests)


def test_a_next_link_to_another_host_is_not_followed(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(body=[crec(1)], headers={"Link": '<http://127.0.0.2:9/v2/files?page=2>; rel="next"'})]
    with make_c_client(stub, fake) as client, pytest.raises(SourceApiError, match="another host"):
        list(client.iter_pages("instance", C_SINCE, C_UNTIL))
    assert len(stub.requests) == 1


def test_epoch_window_bounds_round_outwards(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: Reply(body=[])
    since = C_SINCE + timedelta(microseconds=1500)  # ...000.0015 s: from 1 ms
    until = C_UNTIL + timedelta(microseconds=1)  # ...000.000001 s: up to 1 ms, exclusive
    with make_c_client(stub, fake) as client:
        list(client.iter_pages("subject", since, until))
    assert stub.requests[0].query["modified_from"] == "1793664000001"
    assert stub.requests[0].query["modified_to"] == "1793667600001"


def test_snapshot_expiry_restarts_from_the_last_modified_inclusive(stub: Stub, fake: FakeTime) -> None:
    stub.script = [
        Reply(
            body=[crec(1, 1793664100000), crec(2, 1793664200000)],
            headers=link(stub, "/v2/visits", page="2", snapshot="s1"),
        ),
        error(410, "snapshot_expired", "snapshot s1 expired"),
        Reply(body=[crec(2, 1793664200000), crec(3, 1793664300000)]),
        NO_DELETIONS,
    ]
    with make_c_client(stub, fake) as client:
        got = [r["uuid"][-1] for p in client.iter_pages("study", C_SINCE, C_UNTIL) for r in p.items]
    assert got == ["1", "2", "2", "3"]
    restarted = stub.requests[2]
    assert restarted.path == "/v2/visits"
    assert restarted.query == {"modified_from": "1793664200000", "modified_to": "1793667600000", "page_size": "2"}
    assert fake.sleeps == []


def test_http_date_retry_after_is_judged_by_the_responses_date(stub: Stub, fake: FakeTime) -> None:
    # The stub's Date is weeks away from this machine's clock: only the difference counts.
    stub.script = [
        error(
            429,
            "rate_limited",
            Retry_After="Tue, 03 Nov 2026 00:44:13 GMT",
            Date="Tue, 03 Nov 2026 00:44:09 GMT",
        ),
        error(503, "unavailable", Retry_After="Tue, 03 Nov 2026 00:44:20 GMT", Date="Tue, 03 Nov 2026 00:44:14 GMT"),
        error(429, "rate_limited", Retry_After="Tue, 03 Nov 2026 00:44:00 GMT", Date="Tue, 03 Nov 2026 00:44:14 GMT"),
        Reply(body=[crec(1)]),
        NO_DELETIONS,
    ]
    with make_c_client(stub, fake) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 1
    assert fake.sleeps == [4.0, 6.0, 0.0]  # a date already past: at once


def test_502_without_a_json_body_is_transient(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(status=502), Reply(status=504), Reply(body=[crec(1)]), NO_DELETIONS]
    with make_c_client(stub, fake) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 1
    assert len(fake.sleeps) == 2


def test_the_deletion_feed_follows_the_records_paged_and_filtered_to_the_level(stub: Stub, fake: FakeTime) -> None:
    def item(resource: str, n: int) -> dict[str, Any]:
        return {"resource": resource, "uuid": f"00000000-0000-4000-8000-{n:012d}", "deleted": 1793665000000 + n}

    stub.script = [
        Reply(body=[crec(1)]),  # /files: one page
        Reply(
            body=[item("visits", 1), item("files", 2)],
            headers=link(stub, "/v2/deletions", page="2", snapshot="d1"),
        ),
        Reply(
            body=[item("participants", 3), item("reports", 4)],  # none of the level's: no page
            headers=link(stub, "/v2/deletions", page="3", snapshot="d1"),
        ),
        Reply(body=[item("files", 5), item("acquisitions", 6)]),
    ]
    with make_c_client(stub, fake) as client:
        pages = list(client.iter_pages("instance", C_SINCE, C_UNTIL))
    assert [p.deletions for p in pages] == [False, True, True]
    assert ids(pages, "uuid")[1:] == [
        ["00000000-0000-4000-8000-000000000002"],
        ["00000000-0000-4000-8000-000000000005"],
    ]
    feed = stub.requests[1]
    assert feed.path == "/v2/deletions"
    assert feed.query == {"modified_from": "1793664000000", "modified_to": "1793667600000", "page_size": "2"}
    assert [s.query.get("page") for s in stub.requests[1:]] == [None, "2", "3"]


def test_the_deletion_feed_alone_yields_every_page_with_what_it_left_out(stub: Stub, fake: FakeTime) -> None:
    def item(resource: str, n: int) -> dict[str, Any]:
        return {"resource": resource, "uuid": f"00000000-0000-4000-8000-{n:012d}", "deleted": 1793665000000 + n}

    stub.script = [
        Reply(body=[item("visits", 1), item("files", 2)], headers=link(stub, "/v2/deletions", page="2")),
        Reply(body=[item("reports", 3)]),
    ]
    with make_c_client(stub, fake) as client:
        pages = list(client.iter_deletions("study", C_SINCE, C_UNTIL))
    assert [(len(p.items), p.others, p.deletions) for p in pages] == [(1, 1, True), (0, 1, True)]
    assert [s.path for s in stub.requests] == ["/v2/deletions"] * 2  # the records are not asked for


def test_the_deletion_feed_restarts_from_the_last_deletion_seen(stub: Stub, fake: FakeTime) -> None:
    item = {"resource": "visits", "uuid": "00000000-0000-4000-8000-000000000001", "deleted": 1793665000000}
    stub.script = [
        Reply(body=[]),
        Reply(body=[item], headers=link(stub, "/v2/deletions", page="2", snapshot="d1")),
        error(410, "snapshot_expired"),
        Reply(body=[item]),
    ]
    with make_c_client(stub, fake) as client:
        pages = list(client.iter_pages("study", C_SINCE, C_UNTIL))
    assert [p.deletions for p in pages] == [True, True]
    assert stub.requests[3].query["modified_from"] == "1793665000000"


def test_503_waits_retry_after_in_seconds(stub: Stub, fake: FakeTime) -> None:
    # C's contract says an HTTP date; RFC 9110 allows seconds too, and the client reads either.
    stub.script = [error(503, "maintenance", Retry_After="12"), Reply(body=[crec(1)]), NO_DELETIONS]
    with make_c_client(stub, fake) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 1
    assert fake.sleeps == [12.0]
    assert len(stub.requests) == 3


def test_a_window_in_epoch_seconds_rounds_outwards(stub: Stub, fake: FakeTime) -> None:
    section = c_api()
    section["window"] = {"since_param": "from", "until_param": "to", "format": "epoch_seconds"}
    stub.script = lambda seen: Reply(body=[])
    since = C_SINCE + timedelta(milliseconds=500)  # 1793664000.5 s: from 1793664000
    until = C_UNTIL + timedelta(milliseconds=1)  # 1793667600.001 s: up to 1793667601, exclusive
    with make_c_client(stub, fake, api=api_of(section)) as client:
        list(client.iter_pages("subject", since, until))
    lists, feed = stub.requests
    assert (lists.query["from"], lists.query["to"]) == ("1793664000", "1793667601")
    assert (feed.query["from"], feed.query["to"]) == ("1793664000", "1793667601")  # the feed uses the lists' window


def test_a_deletion_feed_with_its_own_paging_window_records_path_and_params(stub: Stub, fake: FakeTime) -> None:
    section = c_api()
    section["deletions"].update(
        window={"since_param": "deleted_since", "until_param": "deleted_before", "format": "rfc3339"},
        paging={"type": "cursor", "cursor_param": "after", "cursor_path": "next", "page_size_param": "n"},
        records_path="result.items",
        params={"kinds": "all"},
    )

    def item(resource: str, n: int) -> dict[str, Any]:
        return {"resource": resource, "uuid": f"00000000-0000-4000-8000-{n:012d}", "deleted": 1793665000000 + n}

    stub.script = [
        Reply(body=[crec(1)]),  # the list: C's bare array and Link header
        Reply(body={"result": {"items": [item("files", 1), item("visits", 2)]}, "next": "k1"}),
        Reply(body={"result": {"items": [item("files", 3)]}, "next": None}),
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        pages = list(client.iter_pages("instance", C_SINCE, C_UNTIL))
    assert [p.deletions for p in pages] == [False, True, True]
    assert ids(pages, "uuid")[1:] == [
        ["00000000-0000-4000-8000-000000000001"],
        ["00000000-0000-4000-8000-000000000003"],
    ]
    lists, first, second = stub.requests
    assert lists.query == {"modified_from": "1793664000000", "modified_to": "1793667600000", "page_size": "2"}
    assert first.path == "/v2/deletions"
    assert first.query == {
        "deleted_since": "2026-11-03T00:00:00.000000Z",
        "deleted_before": "2026-11-03T01:00:00.000000Z",
        "kinds": "all",
        "n": "2",
    }
    assert second.query == {**first.query, "after": "k1"}


def test_c_counts_come_from_stats(stub: Stub, fake: FakeTime) -> None:
    body = {"participants": 1, "visits": 2, "acquisitions": 3, "files": 4, "as_of": "2026-11-03T01:00:00.000Z"}
    stub.script = [Reply(body=body)]
    with make_c_client(stub, fake) as client:
        assert client.counts() == {"subject": 1, "study": 2, "sequence": 3, "instance": 4}
    assert stub.requests[0].path == "/v2/stats"


def test_counts_are_none_without_a_counts_endpoint(stub: Stub, fake: FakeTime) -> None:
    section = c_api()
    del section["counts"]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        assert client.counts() is None
    assert stub.requests == []


# --- the other paging styles and auths -------------------------------------------------------------


def plain_api(paging: dict[str, Any], auth: dict[str, Any], records_path: str | None = "items") -> RestApi:
    section = c_api()
    section.update(paging=paging, auth=auth, records_path=records_path, deletions={"type": "none"})
    section.pop("expired")
    return api_of(section)


def test_page_number_paging_ends_on_a_short_page(stub: Stub, fake: FakeTime) -> None:
    api = plain_api({"type": "page_number", "page_param": "p", "page_size_param": "n"}, {"type": "bearer"})
    stub.script = [Reply(body={"items": [crec(1), crec(2)]}), Reply(body={"items": [crec(3)]})]
    with make_c_client(stub, fake, api=api) as client:
        assert [len(p.items) for p in client.iter_pages("subject", C_SINCE, C_UNTIL)] == [2, 1]
    assert [(s.query["p"], s.query["n"]) for s in stub.requests] == [("1", "2"), ("2", "2")]


def test_page_number_paging_ends_at_the_announced_last_page(stub: Stub, fake: FakeTime) -> None:
    api = plain_api(
        {"type": "page_number", "page_param": "p", "start": 0, "total_pages_path": "meta.pages"}, {"type": "bearer"}
    )
    stub.script = [
        Reply(body={"items": [crec(1), crec(2)], "meta": {"pages": 2}}),
        Reply(body={"items": [crec(3), crec(4)], "meta": {"pages": 2}}),  # full, but the last
    ]
    with make_c_client(stub, fake, api=api) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 2
    assert [s.query["p"] for s in stub.requests] == ["0", "1"]
    assert "page_size" not in stub.requests[0].query  # no page size parameter in this spec


def test_offset_paging_and_its_total(stub: Stub, fake: FakeTime) -> None:
    api = plain_api(
        {"type": "offset", "offset_param": "skip", "limit_param": "take", "total_path": "total"}, {"type": "bearer"}
    )
    stub.script = [
        Reply(body={"items": [crec(1), crec(2)], "total": 4}),
        Reply(body={"items": [crec(3), crec(4)], "total": 4}),
    ]
    with make_c_client(stub, fake, api=api) as client:
        assert [len(p.items) for p in client.iter_pages("subject", C_SINCE, C_UNTIL)] == [2, 2]
    assert [(s.query["skip"], s.query["take"]) for s in stub.requests] == [("0", "2"), ("2", "2")]


def test_offset_paging_ends_on_an_empty_page(stub: Stub, fake: FakeTime) -> None:
    api = plain_api({"type": "offset", "offset_param": "skip", "limit_param": "take"}, {"type": "bearer"}, None)
    stub.script = [Reply(body=[crec(1), crec(2)]), Reply(body=[])]
    with make_c_client(stub, fake, api=api) as client:
        assert [len(p.items) for p in client.iter_pages("subject", C_SINCE, C_UNTIL)] == [2]
    assert [s.query["skip"] for s in stub.requests] == ["0", "2"]


def test_next_link_paging_from_the_body(stub: Stub, fake: FakeTime) -> None:
    api = plain_api({"type": "next_link", "next_path": "links.next", "page_size_param": "size"}, {"type": "bearer"})
    stub.script = [
        Reply(body={"items": [crec(1)], "links": {"next": "/v2/participants?cursor=abc"}}),
        Reply(body={"items": [crec(2)], "links": {"next": None}}),
    ]
    with make_c_client(stub, fake, api=api) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 2
    assert stub.requests[0].query["size"] == "2"
    assert (stub.requests[1].path, stub.requests[1].raw_query) == ("/v2/participants", "cursor=abc")


def test_basic_auth_sends_login_and_password(stub: Stub, fake: FakeTime) -> None:
    api = plain_api({"type": "page_number", "page_param": "p"}, {"type": "basic"})
    stub.script = [Reply(body={"items": []}), error(403, "forbidden")]
    with make_c_client(stub, fake, api=api, login="medsync") as client:
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))
        with pytest.raises(SourceApiError, match="refused the login"):
            list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    expected = base64.b64encode(f"medsync:{TOKEN}".encode()).decode()
    assert stub.requests[0].headers["Authorization"] == f"Basic {expected}"
    with pytest.raises(ConfigError, match="login"):
        make_c_client(stub, fake, api=api)


def test_header_auth_with_another_header_name(stub: Stub, fake: FakeTime) -> None:
    api = plain_api({"type": "page_number", "page_param": "p"}, {"type": "header", "header": "X-Token"})
    stub.script = [Reply(body={"items": []})]
    with make_c_client(stub, fake, api=api) as client:
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    assert stub.requests[0].headers["X-Token"] == TOKEN
    assert "Authorization" not in stub.requests[0].headers


# --- per-level settings, the listing's order, windows without an upper bound -----------------------


def section_of(**changes: Any) -> dict[str, Any]:
    """C's section without expiry or a feed (one request per page), with ``changes``."""
    section = c_api()
    section.pop("expired")
    section["deletions"] = {"type": "none"}
    section.update(changes)
    return section


M0 = 1793664000000  # C_SINCE in epoch milliseconds


def test_a_level_overrides_key_version_and_window(stub: Stub, fake: FakeTime) -> None:
    paging = {"type": "last_record", "cursor_param": "after", "has_more_path": "more", "page_size_param": "n"}
    section = section_of(paging=paging, records_path="items")
    section["levels"]["study"].update(
        key={"path": "ref"},
        version={"path": "changed", "format": "rfc3339"},
        window={"since_param": "changed_since", "until_param": "changed_before"},
    )
    visit = {"ref": "v1", "changed": "2026-11-03T00:10:00Z"}
    stub.script = [
        Reply(body={"items": [visit], "more": True}),
        Reply(body={"items": [], "more": False}),
        Reply(body={"items": [crec(1)], "more": False}),
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        assert len(list(client.iter_pages("study", C_SINCE, C_UNTIL))) == 1
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 1
    study, next_page, subject = stub.requests
    assert study.query == {
        "changed_since": "2026-11-03T00:00:00.000000Z",
        "changed_before": "2026-11-03T01:00:00.000000Z",
        "n": "2",
    }
    assert next_page.query["after"] == "v1"  # the level's key is the last record's cursor
    assert subject.query == {"modified_from": str(M0), "modified_to": str(M0 + 3_600_000), "n": "2"}


def test_an_expired_sorted_listing_resumes_at_the_last_version_of_the_levels_own_version(
    stub: Stub, fake: FakeTime
) -> None:
    section = section_of(expired={"status": 410}, order="unsorted")
    section["levels"]["study"].update(version={"path": "changed", "format": "epoch_millis"}, order="version_ascending")
    stub.script = [
        Reply(body=[{"uuid": "a", "changed": M0 + 5}], headers=link(stub, "/v2/visits", page="2")),
        error(410, "gone"),
        Reply(body=[{"uuid": "b", "changed": M0 + 9}]),
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        assert ids(list(client.iter_pages("study", C_SINCE, C_UNTIL)), "uuid") == [["a"], ["b"]]
    assert stub.requests[2].query["modified_from"] == str(M0 + 5)


def test_an_expired_unsorted_listing_restarts_from_the_windows_start(stub: Stub, fake: FakeTime) -> None:
    section = section_of(expired={"status": 410}, order="unsorted")
    stub.script = [
        Reply(body=[crec(1, M0 + 50), crec(2, M0 + 10)], headers=link(stub, "/v2/participants", page="2")),
        error(410, "gone"),
        Reply(body=[crec(1, M0 + 50), crec(2, M0 + 10)], headers=link(stub, "/v2/participants", page="2")),
        Reply(body=[crec(3, M0 + 30)]),
    ]
    since = C_SINCE + timedelta(milliseconds=1)
    with make_c_client(stub, fake, api=api_of(section)) as client:
        got = [r["uuid"][-1] for p in client.iter_pages("subject", since, C_UNTIL) for r in p.items]
    assert got == ["1", "2", "1", "2", "3"]  # read twice from the start: nothing skipped
    assert stub.requests[2].query["modified_from"] == str(M0 + 1)  # not M0 + 10, where paging stopped


def test_an_unsorted_listing_that_expires_before_getting_further_gives_up(stub: Stub, fake: FakeTime) -> None:
    section = section_of(expired={"status": 410}, order="unsorted")

    def script(seen: Seen) -> Reply:
        if "page" in seen.query:
            return error(410, "gone")
        return Reply(body=[crec(1)], headers=link(stub, "/v2/participants", page="2"))

    stub.script = script
    with (
        make_c_client(stub, fake, api=api_of(section)) as client,
        pytest.raises(SourceApiError, match=r"each pass from the window's start getting no further than 1 pages"),
    ):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    assert len(stub.requests) == 2 * 4  # the first pass, then three that got no further


def test_a_listing_declared_sorted_that_is_not_fails_rather_than_skip_on_a_restart(stub: Stub, fake: FakeTime) -> None:
    section = section_of(order="version_ascending")
    stub.script = [
        Reply(body=[crec(1, M0 + 50)], headers=link(stub, "/v2/participants", page="2")),
        Reply(body=[crec(2, M0 + 10)]),
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client, pytest.raises(SourceApiError, match="not sorted"):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))


def test_without_an_upper_bound_records_at_or_after_until_are_dropped_and_unsorted_lists_are_read_whole(
    stub: Stub, fake: FakeTime
) -> None:
    section = section_of(window={"since_param": "since", "format": "rfc3339"}, order="unsorted")
    until_ms = M0 + 3_600_000
    stub.script = [
        Reply(body=[crec(1, M0), crec(2, until_ms)], headers=link(stub, "/v2/participants", page="2")),
        Reply(body=[crec(3, until_ms + 1), crec(4, until_ms - 1)], headers=link(stub, "/v2/participants", page="3")),
        Reply(body=[{"uuid": "bad", "modified": "soon"}]),  # passed on: the parser quarantines it
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        got = [r["uuid"][-3:] for p in client.iter_pages("subject", C_SINCE, C_UNTIL) for r in p.items]
    assert got == ["001", "004", "bad"]
    assert stub.requests[0].query == {"since": "2026-11-03T00:00:00.000000Z", "page_size": "2"}


def test_without_an_upper_bound_a_sorted_listing_stops_at_the_first_page_reaching_until(
    stub: Stub, fake: FakeTime
) -> None:
    section = section_of(window={"since_param": "since"}, order="version_ascending")
    until_ms = M0 + 3_600_000
    stub.script = [
        Reply(body=[crec(1, M0), crec(2, M0 + 1)], headers=link(stub, "/v2/participants", page="2")),
        Reply(body=[crec(3, until_ms - 1), crec(4, until_ms)], headers=link(stub, "/v2/participants", page="3")),
    ]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        got = [r["uuid"][-1] for p in client.iter_pages("subject", C_SINCE, C_UNTIL) for r in p.items]
    assert got == ["1", "2", "3"]
    assert len(stub.requests) == 2  # page 3 is never asked for


def test_a_window_template_carries_both_bounds_in_one_parameter(stub: Stub, fake: FakeTime) -> None:
    template = "Modified ge {since} and Modified lt {until} and Kind eq '{{x}}'"
    section = section_of(window={"templates": {"$filter": template}, "format": "rfc3339"})
    stub.script = [Reply(body=[])]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    assert stub.requests[0].query == {
        "$filter": "Modified ge 2026-11-03T00:00:00.000000Z and Modified lt 2026-11-03T01:00:00.000000Z "
        "and Kind eq '{x}'",
        "page_size": "2",
    }


# --- the paging the API styles need ------------------------------------------------------------------


def test_an_absent_next_link_ends_the_listing_when_declared_else_fails(stub: Stub, fake: FakeTime) -> None:
    paging = {"type": "next_link", "next_path": "links.next", "absent_on_last_page": True}
    stub.script = [
        Reply(body={"items": [crec(1)], "links": {"next": "/v2/participants?page=2"}}),
        Reply(body={"items": [crec(2)], "links": {"self": "/v2/participants?page=2"}}),  # no next: the last
        Reply(body={"items": [crec(3)]}),  # no links at all: the last too
    ]
    with make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"})) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 2
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 1
    paging["absent_on_last_page"] = False
    stub.script = [Reply(body={"items": [crec(2)], "links": {}})]
    with (
        make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"})) as client,
        pytest.raises(SourceApiError, match="with the next link"),
    ):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))


def test_an_absent_cursor_ends_the_listing_when_declared(stub: Stub, fake: FakeTime) -> None:
    paging = {"type": "cursor", "cursor_param": "c", "cursor_path": "meta.next", "absent_on_last_page": True}
    stub.script = [Reply(body={"items": [crec(1)], "meta": {"next": "k"}}), Reply(body={"items": [crec(2)]})]
    with make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"})) as client:
        assert len(list(client.iter_pages("subject", C_SINCE, C_UNTIL))) == 2
    assert stub.requests[1].query["c"] == "k"


def test_an_absent_records_path_is_an_empty_page_when_declared_else_fails(stub: Stub, fake: FakeTime) -> None:
    section = section_of(
        records_path="_embedded.people",
        paging={"type": "page_number", "page_param": "page", "start": 0, "total_pages_path": "page.totalPages"},
        empty_page_omits_records=True,
    )
    stub.script = [Reply(body={"_links": {}, "page": {"totalPages": 0}})]
    with make_c_client(stub, fake, api=api_of(section)) as client:
        assert list(client.iter_pages("subject", C_SINCE, C_UNTIL)) == []
    section["empty_page_omits_records"] = False
    stub.script = [Reply(body={"_links": {}, "page": {"totalPages": 0}})]
    with (
        make_c_client(stub, fake, api=api_of(section)) as client,
        pytest.raises(SourceApiError, match=r"an object with _embedded\.people"),
    ):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))


def test_last_record_paging_continues_after_the_last_record_until_has_more_is_false(stub: Stub, fake: FakeTime) -> None:
    paging = {"type": "last_record", "cursor_param": "starting_after", "has_more_path": "has_more",
              "page_size_param": "limit"}  # fmt: skip
    stub.script = [
        Reply(body={"data": [crec(1), crec(2)], "has_more": True}),
        Reply(body={"data": [crec(3), crec(4)], "has_more": True}),
        Reply(body={"data": [crec(5)], "has_more": False}),
    ]
    with make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"}, "data")) as client:
        assert [len(p.items) for p in client.iter_pages("subject", C_SINCE, C_UNTIL)] == [2, 2, 1]
    assert [s.query.get("starting_after", "")[-1:] for s in stub.requests] == ["", "2", "4"]
    assert all(s.query["limit"] == "2" for s in stub.requests)

    for body, expected in [
        ({"data": [crec(1)]}, "with has_more"),
        ({"data": [crec(1)], "has_more": "yes"}, "with has_more"),
        ({"data": [{"modified": M0}], "has_more": True}, "last record has no uuid"),
    ]:
        stub.script = [Reply(body=body)]
        with (
            make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"}, "data")) as client,
            pytest.raises(SourceApiError, match=expected),
        ):
            list(client.iter_pages("subject", C_SINCE, C_UNTIL))


def test_last_record_paging_reads_another_cursor_field_and_refuses_to_loop(stub: Stub, fake: FakeTime) -> None:
    paging = {"type": "last_record", "cursor_param": "after", "cursor_path": "seq", "has_more_path": "more"}
    stub.script = [
        Reply(body={"data": [crec(1) | {"seq": 7}], "more": True}),
        Reply(body={"data": [crec(2) | {"seq": 7}], "more": True}),
    ]
    with (
        make_c_client(stub, fake, api=plain_api(paging, {"type": "bearer"}, "data")) as client,
        pytest.raises(SourceApiError, match="ended on the record it started after"),
    ):
        list(client.iter_pages("subject", C_SINCE, C_UNTIL))
    assert stub.requests[1].query["after"] == "7"


# --- the Airflow hook -------------------------------------------------------------------------------


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **conn: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "http", **conn}))


def b_config(**overrides: Any) -> SourceConfig:
    return SourceConfig.model_validate(
        {
            "name": "b",
            "protocol": "rest",
            "api": b_api(),
            "connections": {"api_conn_id": "b_api"},
            "storage": {"aws_conn_id": "b_aws", "bucket": "b-images"},
            **overrides,
        }
    )


def test_hook_builds_a_client_that_sends_the_password_as_key(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.sources.rest.hook import RestSourceHook

    set_conn(monkeypatch, "medsync_b_api", host=stub.base_url, password=API_KEY)
    stub.script = [Reply(body={"patients": 1, "studies": 2, "series": 3, "images": 4, "as_of": "x"})]
    hook = RestSourceHook(
        "medsync_b_api", api=B_API, timeout=7.0, max_attempts=2, max_backoff_seconds=3.0, rate_limit_per_second=None
    )
    with hook.get_conn() as client:
        assert client.base_url == stub.base_url
        assert client.timeout == (7.0, 7.0)
        counts = client.counts()
        assert counts is not None and counts["instance"] == 4
    assert stub.requests[0].headers["X-API-Key"] == API_KEY


def test_hook_connection_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.sources.rest.hook import RestSourceHook

    cfg = b_config(request_timeout_seconds=12, max_attempts=3, max_backoff_seconds=9, rate_limit_per_second=5)
    set_conn(
        monkeypatch,
        "b_api",
        host="b.example.internal",
        schema="http",
        port=8443,
        password="k-1234567",
        extra={"base_path": "/export/v2/", "timeout": "45"},
    )
    client = RestSourceHook.from_source(cfg, B_API).get_conn()
    assert client.base_url == "http://b.example.internal:8443/export/v2"
    assert client.timeout == (10.0, 45.0)  # extra timeout wins over the config's
    assert (client.max_attempts, client.max_backoff_seconds, client.rate_limit_per_second) == (3, 9.0, 5.0)
    assert client.page_size == cfg.page_size

    set_conn(monkeypatch, "b_api", host="b.example.internal", password="k-1234567")
    assert RestSourceHook.from_source(cfg, B_API).get_conn().base_url == "https://b.example.internal/api/v1"
    assert RestSourceHook.from_source(cfg, B_API).get_conn().timeout == (10.0, 12.0)

    set_conn(monkeypatch, "b_api", host="https://b.example.internal", password="k-1234567")
    assert RestSourceHook.from_source(cfg, B_API).get_conn().base_url == "https://b.example.internal/api/v1"

    set_conn(monkeypatch, "b_api", host="https://b.example.internal/", password="k-1234567", extra={"base_path": "/"})
    assert RestSourceHook.from_source(cfg, B_API).get_conn().base_url == "https://b.example.internal"

    set_conn(monkeypatch, "b_api", host="b.example.internal", schema="ftp", password="k-1234567")
    with pytest.raises(ConfigError, match="schema"):
        RestSourceHook.from_source(cfg, B_API).get_conn()

    set_conn(monkeypatch, "b_api", host="https://b.example.internal/api/v1", port=8443, password="k-1234567")
    with pytest.raises(ConfigError, match="port in the URL"):
        RestSourceHook.from_source(cfg, B_API).get_conn()


def test_hook_shares_a_run_wide_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.sources.rest.hook import RestSourceHook

    set_conn(monkeypatch, "b_api", host="https://b.example.internal", password="k-1234567")
    shared = TokenBucket(3.0)
    client = RestSourceHook.from_source(b_config(), B_API, shared).get_conn()
    assert client.limiter is shared


def test_hook_refuses_a_connection_without_password_or_an_unknown_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medsync.sources.rest.hook import RestSourceHook

    set_conn(monkeypatch, "medsync_b_api", host="http://127.0.0.1:1/api/v1")
    with pytest.raises(ConfigError, match="no password"):
        RestSourceHook("medsync_b_api", api=B_API).get_conn()
    monkeypatch.delenv("AIRFLOW_CONN_MEDSYNC_B_API")
    with pytest.raises(ConfigError, match="not defined"):
        RestSourceHook("medsync_b_api", api=B_API).get_conn()


def test_hook_basic_auth_needs_a_login(monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.sources.rest.hook import RestSourceHook

    api = plain_api({"type": "page_number", "page_param": "p"}, {"type": "basic"})
    set_conn(monkeypatch, "c_api", host="https://c.example.com/v2", password="pw-123456")
    with pytest.raises(ConfigError, match="no login"):
        RestSourceHook("c_api", api=api).get_conn()
    set_conn(monkeypatch, "c_api", host="https://c.example.com/v2", login="medsync", password="pw-123456")
    assert RestSourceHook("c_api", api=api).get_conn().base_url == "https://c.example.com/v2"


def test_hook_reads_a_medsync_rest_connection_and_an_http_one_alike(
    stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # medsync_rest is the type whose form says where the secret goes (tests/test_providers.py);
    # http connections of existing deployments keep working.
    from medsync.sources.rest.hook import RestSourceHook

    assert (RestSourceHook.conn_type, RestSourceHook.conn_name_attr) == ("medsync_rest", "api_conn_id")
    body = {"patients": 1, "studies": 2, "series": 3, "images": 4, "as_of": "x"}
    for conn_type in ("medsync_rest", "http"):
        monkeypatch.setenv(
            "AIRFLOW_CONN_MEDSYNC_B_API",
            json.dumps({"conn_type": conn_type, "host": stub.base_url, "password": API_KEY}),
        )
        stub.script = [Reply(body=body)]
        with RestSourceHook("medsync_b_api", api=B_API, rate_limit_per_second=None).get_conn() as client:
            assert client.counts() == {"subject": 1, "study": 2, "sequence": 3, "instance": 4}
        assert stub.requests[-1].headers["X-API-Key"] == API_KEY


# --- against B's simulator (the contract's reference implementation) --------------------------------


def test_every_level_is_read_whole_from_bs_simulator_through_its_faults(fake: FakeTime) -> None:
    from simulator import BSimulator, SimConfig

    resources = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}
    config = SimConfig(
        seed=5, patients=6, studies_per_patient=2, series_per_study=2, images_per_series=4, clock="manual"
    )
    with BSimulator(config, api_key=API_KEY) as sim:
        sim.set_faults(throttle_every=5, error_every=7, drop_every=11, expire_every=3, max_faults=60)
        with RestClient(
            sim.base_url,
            B_API,
            API_KEY,
            page_size=7,
            timeout=5.0,
            max_attempts=6,
            max_backoff_seconds=1.0,
            sleep=fake.sleep,
            clock=fake.clock,
            name="b",
        ) as client:
            for level, resource in resources.items():
                got = {r["id"] for p in client.iter_listing(level) for r in p.items}
                assert got == {r["id"] for r in sim.live_records(resource)}, level
            counts = client.counts()
        faults = sim.stats()["faults"]
    assert counts == {"subject": 6, "study": 12, "sequence": 24, "instance": 96}
    assert faults["expire"] > 0 and faults["throttle"] > 0 and faults["error"] > 0 and faults["drop"] > 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [{"id": "p1", "n": 3, "x": 1.5, "ok": true, "none": null, "t": "caf\\u00e9 \\u0000"}]}',
        '{"data": ["\ud55c\uae00 \U0001f600"]}'.encode(),
        '{"data": [1]}'.encode("utf-16"),  # not UTF-8: json.loads detects the encoding
        b'{"n": NaN, "big": 123456789012345678901234567890}',  # outside msgspec's JSON: json.loads's reading
        b'{"k": 1, "k": 2}',  # a repeated key: the last one, as json.loads keeps it
    ],
)
def test_pages_are_parsed_exactly_as_json_loads_reads_them(body: bytes) -> None:
    from medsync.sources.rest.client import parse_json

    parsed, expected = parse_json(body), json.loads(body)
    assert json.dumps(parsed, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_a_body_that_is_not_json_is_refused_as_json_loads_refuses_it() -> None:
    from medsync.sources.rest.client import parse_json

    with pytest.raises(ValueError):
        parse_json(b'{"data": [')
