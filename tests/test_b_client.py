"""BApiClient and SourceApiHook against a scripted stub of B on 127.0.0.1 (a real socket).

Each test scripts the stub's replies, then checks what the client did: what it sent,
what it yielded or raised, how long it slept. Sleeping is injected, so backoff and
Retry-After tests take milliseconds; only the timeout test waits for real (briefly).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from medsync.config import SourceConfig
from medsync.errors import ConfigError, SourceApiError, SourceUnavailableError
from medsync.sources import api_model, known_protocols
from medsync.sources.b_rest.client import BApiClient, TokenBucket

API_KEY = "sk-test-Zq8VwQ3xLp"
SINCE = datetime(2026, 11, 19, 0, 0, tzinfo=UTC)
UNTIL = datetime(2026, 11, 19, 12, 0, tzinfo=UTC)


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


class Stub:
    """B on a real socket. ``script``: replies in order, or a function of the request."""

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
                seen = Seen(parts.path, query, dict(self.headers))
                reply = stub._reply_for(seen)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                body = json.dumps(reply.body).encode() if reply.body is not None else b""
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

    def _reply_for(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            if callable(self.script):
                return self.script(seen)
            if not self.script:
                return error(599, "stub_script_exhausted")
            return self.script.pop(0)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/api/v1"


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    s.thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()


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


def make_client(stub: Stub, fake: FakeTime, **overrides: Any) -> BApiClient:
    kwargs: dict[str, Any] = {
        "timeout": 5.0,
        "max_attempts": 4,
        "max_backoff_seconds": 30.0,
        "rate_limit_per_second": None,
        "sleep": fake.sleep,
        "clock": fake.clock,
    }
    kwargs.update(overrides)
    return BApiClient(stub.base_url, API_KEY, **kwargs)


# --- paging -----------------------------------------------------------------------------------------


def test_pages_follow_the_cursor_until_null(stub: Stub, fake: FakeTime) -> None:
    stub.script = [page([rec(1), rec(2)], "c1"), page([rec(3)], "c2"), page([rec(4)], None)]
    with make_client(stub, fake) as client:
        pages = list(client.iter_pages("patients", SINCE, UNTIL, page_size=2))
    assert [[r["id"] for r in p] for p in pages] == [["pat_0001", "pat_0002"], ["pat_0003"], ["pat_0004"]]
    assert [s.query.get("cursor") for s in stub.requests] == [None, "c1", "c2"]
    assert {s.path for s in stub.requests} == {"/api/v1/patients"}
    assert fake.sleeps == []


def test_every_request_sends_both_bounds_in_utc_include_deleted_and_limit(stub: Stub, fake: FakeTime) -> None:
    seoul = timezone(timedelta(hours=9))
    since = datetime(2026, 11, 19, 9, 0, 0, 5, tzinfo=seoul)  # 00:00:00.000005 UTC
    until = datetime(2026, 11, 19, 21, 0, tzinfo=seoul)
    stub.script = [page([rec(1)], "c1"), page([], None)]
    with make_client(stub, fake) as client:
        assert len(list(client.iter_pages("images", since, until, page_size=250))) == 1  # empty page skipped
    for seen in stub.requests:
        assert seen.path == "/api/v1/images"
        assert seen.query["updated_since"] == "2026-11-19T00:00:00.000005Z"
        assert seen.query["updated_before"] == "2026-11-19T12:00:00.000000Z"
        assert seen.query["include_deleted"] == "true"
        assert seen.query["limit"] == "250"
        assert seen.headers["X-API-Key"] == API_KEY


def test_window_arguments_are_checked_before_any_request(stub: Stub, fake: FakeTime) -> None:
    with make_client(stub, fake) as client:
        assert list(client.iter_pages("studies", SINCE, SINCE, page_size=10)) == []
        with pytest.raises(ValueError, match="naive"):
            list(client.iter_pages("studies", SINCE.replace(tzinfo=None), UNTIL, page_size=10))
        with pytest.raises(ValueError, match="after it ends"):
            list(client.iter_pages("studies", UNTIL, SINCE, page_size=10))
        with pytest.raises(ValueError, match="page_size"):
            list(client.iter_pages("studies", SINCE, UNTIL, page_size=1001))
        with pytest.raises(ValueError, match="unknown B resource"):
            list(client.iter_pages("subjects", SINCE, UNTIL, page_size=10))
    assert stub.requests == []


def test_expired_cursor_resumes_from_last_updated_at_received(stub: Stub, fake: FakeTime) -> None:
    stub.script = [
        page([rec(1, "2026-11-19T08:00:00+09:00"), rec(2, "2026-11-19T09:30:00.25+09:00")], "c1"),
        error(400, "cursor_expired", "cursor is older than one hour"),
        page([rec(2, "2026-11-19T09:30:00.25+09:00"), rec(3, "2026-11-19T01:00:00Z")], None),
    ]
    with make_client(stub, fake) as client:
        ids = [r["id"] for p in client.iter_pages("patients", SINCE, UNTIL, page_size=2) for r in p]
    assert ids == ["pat_0001", "pat_0002", "pat_0002", "pat_0003"]
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
    with make_client(stub, fake) as client:
        ids = [r["id"] for p in client.iter_pages("patients", SINCE, UNTIL, page_size=2) for r in p]
    assert ids == ["pat_0001", "pat_0002", "pat_0003"]
    assert stub.requests[2].query["updated_since"] == "2026-11-19T02:00:00.000000Z"


def test_cursor_expiring_without_progress_gives_up(stub: Stub, fake: FakeTime) -> None:
    def script(seen: Seen) -> Reply:
        if "cursor" in seen.query:
            return error(400, "cursor_expired")
        return page([rec(1, "2026-11-19T00:00:00Z")], "c")

    stub.script = script
    with make_client(stub, fake) as client, pytest.raises(SourceApiError, match="without progress"):
        list(client.iter_pages("patients", SINCE, UNTIL, page_size=1))
    assert len(stub.requests) < 10


# --- retries ----------------------------------------------------------------------------------------


def test_5xx_is_retried_with_growing_jittered_backoff(stub: Stub, fake: FakeTime) -> None:
    stub.script = [error(503, "unavailable"), error(500, "internal"), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        pages = list(client.iter_pages("series", SINCE, UNTIL, page_size=10))
    assert len(pages) == 1
    assert len(stub.requests) == 3
    assert len(fake.sleeps) == 2
    assert 0.5 <= fake.sleeps[0] <= 1.0
    assert 1.0 <= fake.sleeps[1] <= 2.0


def test_dropped_connection_is_retried(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(drop=True), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        pages = list(client.iter_pages("patients", SINCE, UNTIL, page_size=10))
    assert [r["id"] for r in pages[0]] == ["pat_0001"]
    assert len(stub.requests) == 2
    assert len(fake.sleeps) == 1


def test_429_waits_retry_after_seconds(stub: Stub, fake: FakeTime) -> None:
    stub.script = [error(429, "rate_limited", Retry_After="7"), page([rec(1)], None)]
    with make_client(stub, fake) as client:
        assert len(list(client.iter_pages("patients", SINCE, UNTIL, page_size=10))) == 1
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
        list(client.iter_pages("studies", SINCE, UNTIL, page_size=10))
    message = str(caught.value)
    assert "studies" in message and "503" in message and "4 attempts" in message
    assert len(stub.requests) == 4
    assert len(fake.sleeps) == 3 and all(0 < s <= 1.5 for s in fake.sleeps)


def test_slow_answer_times_out_and_is_retried(stub: Stub, fake: FakeTime) -> None:
    stub.script = [Reply(delay=2.0, body={"data": [rec(9)], "next_cursor": None}), page([rec(1)], None)]
    started = time.monotonic()
    with make_client(stub, fake, timeout=0.3) as client:
        pages = list(client.iter_pages("patients", SINCE, UNTIL, page_size=10))
    assert time.monotonic() - started < 1.5  # the client did not wait for the slow answer
    assert [r["id"] for r in pages[0]] == ["pat_0001"]
    assert len(stub.requests) == 2
    assert client.timeout == (0.3, 0.3)


# --- refusals ---------------------------------------------------------------------------------------


def test_401_fails_at_once_without_revealing_the_key(stub: Stub, fake: FakeTime) -> None:
    stub.script = lambda seen: error(401, "unauthorized", "invalid API key")
    with make_client(stub, fake) as client, pytest.raises(SourceApiError) as caught:
        list(client.iter_pages("patients", SINCE, UNTIL, page_size=10))
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


def test_counts_and_get_record(stub: Stub, fake: FakeTime) -> None:
    def script(seen: Seen) -> Reply:
        if seen.path == "/api/v1/counts":
            counts = {"patients": 3, "studies": 4, "series": 5, "images": 6}
            return Reply(body={**counts, "as_of": "2026-11-19T00:00:00Z"})
        if seen.path == "/api/v1/images/img%2F1":
            return Reply(body={"id": "img/1", "updated_at": "2026-11-19T00:00:00Z", "deleted": True})
        return error(404, "not_found", "no such record")

    stub.script = script
    with make_client(stub, fake) as client:
        assert client.counts() == {"patients": 3, "studies": 4, "series": 5, "images": 6}
        assert client.get_record("images", "img/1") == {
            "id": "img/1",
            "updated_at": "2026-11-19T00:00:00Z",
            "deleted": True,
        }
        assert client.get_record("images", "img_404") is None
    assert fake.sleeps == []


def test_api_key_with_whitespace_is_refused_without_echoing_it(stub: Stub) -> None:
    with pytest.raises(ConfigError) as caught:
        BApiClient(
            stub.base_url, "bad key\n", timeout=1, max_attempts=1, max_backoff_seconds=1, rate_limit_per_second=None
        )
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
    with make_client(stub, fake) as client:
        assert len(list(client.iter_pages("patients", SINCE, UNTIL, page_size=1))) == 2
        with pytest.raises(SourceApiError):
            client.counts()
    out = capsys.readouterr()
    logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    assert any(r.name.startswith("urllib3") for r in caplog.records)  # debug logging really was on
    assert any(r.levelno == logging.INFO and "2 pages, 2 records" in r.getMessage() for r in caplog.records)
    for secret in (API_KEY, "Hong", "Gildong", "MRN-998877", "1970-01-02"):
        assert secret not in logged
        assert secret not in out.out and secret not in out.err


# --- registry ---------------------------------------------------------------------------------------


def test_protocol_registry() -> None:
    assert "b_rest" in known_protocols()
    assert api_model("b_rest").model_validate({}) is not None
    with pytest.raises(ConfigError, match="unknown source protocol"):
        api_model("dicomweb_nope")


# --- the Airflow hook -------------------------------------------------------------------------------


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **conn: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "http", **conn}))


def test_hook_builds_a_client_that_sends_the_password_as_key(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.hooks.source_api import SourceApiHook

    set_conn(monkeypatch, "medsync_b_api", host=stub.base_url, password=API_KEY)
    stub.script = [Reply(body={"patients": 1, "studies": 2, "series": 3, "images": 4, "as_of": "x"})]
    hook = SourceApiHook(timeout=7.0, max_attempts=2, max_backoff_seconds=3.0, rate_limit_per_second=None)
    with hook.get_conn() as client:
        assert client.base_url == stub.base_url
        assert client.timeout == (7.0, 7.0)
        assert client.counts()["images"] == 4
    assert stub.requests[0].headers["X-API-Key"] == API_KEY


def test_hook_connection_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.hooks.source_api import SourceApiHook

    cfg = SourceConfig.model_validate(
        {
            "name": "b",
            "protocol": "b_rest",
            "connections": {"api_conn_id": "b_api"},
            "storage": {"aws_conn_id": "b_aws", "bucket": "b-images"},
            "request_timeout_seconds": 12,
            "max_attempts": 3,
            "max_backoff_seconds": 9,
            "rate_limit_per_second": 5,
        }
    )
    set_conn(
        monkeypatch,
        "b_api",
        host="b.example.internal",
        schema="http",
        port=8443,
        password="k-1234567",
        extra={"base_path": "/export/v2/", "timeout": "45"},
    )
    client = SourceApiHook.from_source_config(cfg).get_conn()
    assert client.base_url == "http://b.example.internal:8443/export/v2"
    assert client.timeout == (10.0, 45.0)  # extra timeout wins over the config's
    assert (client.max_attempts, client.max_backoff_seconds, client.rate_limit_per_second) == (3, 9.0, 5.0)

    set_conn(monkeypatch, "b_api", host="b.example.internal", password="k-1234567")
    assert SourceApiHook.from_source_config(cfg).get_conn().base_url == "https://b.example.internal/api/v1"
    assert SourceApiHook.from_source_config(cfg).get_conn().timeout == (10.0, 12.0)

    set_conn(monkeypatch, "b_api", host="https://b.example.internal", password="k-1234567")
    assert SourceApiHook.from_source_config(cfg).get_conn().base_url == "https://b.example.internal/api/v1"

    set_conn(monkeypatch, "b_api", host="b.example.internal", schema="ftp", password="k-1234567")
    with pytest.raises(ConfigError, match="schema"):
        SourceApiHook.from_source_config(cfg).get_conn()


def test_hook_refuses_a_connection_without_password_or_an_unknown_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medsync.hooks.source_api import SourceApiHook

    set_conn(monkeypatch, "medsync_b_api", host="http://127.0.0.1:1/api/v1")
    with pytest.raises(ConfigError, match="no password"):
        SourceApiHook().get_conn()
    monkeypatch.delenv("AIRFLOW_CONN_MEDSYNC_B_API")
    with pytest.raises(ConfigError, match="not defined"):
        SourceApiHook().get_conn()
