"""The dicomweb client against a small real HTTP server (a PACS whose studies disagree about a patient).

Orthanc keeps one copy of a patient's attributes for all its studies, so the rule "the latest
study's patient attributes win" is tested here, with a server that answers QIDO-RS as a PACS
with per-study patient attributes does (dcm4chee, cloud stores): paging by limit/offset, a
bearer token from the Airflow connection, a streamed WADO-RS multipart answer.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from medsync.config import get_source_config
from medsync.errors import SourceApiError
from medsync.schema import migrate
from medsync.sources import open_source
from medsync.sources.dicomweb.client import DicomwebClient, multipart_first_part
from tests.conftest import connection_uri

TOKEN = "bearer-token-3f9a"


def study(uid: str, name: str, date: str | None, pid: str = "P1", time: str | None = "120000") -> dict[str, Any]:
    item: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": [pid]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
    }
    if date:
        item["00080020"] = {"vr": "DA", "Value": [date]}
    if time:
        item["00080030"] = {"vr": "TM", "Value": [time]}
    return item


STUDIES = [
    study("1.1", "Old^Name", "20200101"),
    study("1.2", "Newest^Name", "20240101"),  # the latest: its attributes win
    study("1.3", "Undated^Name", None),
    study("1.4", "Middle^Name", "20220101"),
    study("2.1", "Other^Patient", None, pid="P2"),
    study("2.2", "Other^Patient Later", None, pid="P2"),  # tie among undated studies: greater UID wins
]
DICOM = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40


class Pacs(BaseHTTPRequestHandler):
    seen_auth: list[str] = []
    arrivals: list[float] = []
    """When each request arrived (monotonic seconds), retries included."""
    busy: list[int] = []
    """Answer this many of the next requests with 503 (a retry is expected)."""
    cap: list[int] = []
    """The largest page served, whatever ``limit`` asks (a server capping its pages silently)."""

    def log_message(self, *args: Any) -> None:
        pass  # quiet

    def do_GET(self) -> None:
        Pacs.arrivals.append(time.monotonic())
        if Pacs.busy and Pacs.busy[0] > 0:
            Pacs.busy[0] -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        Pacs.seen_auth.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/rs/studies":
            limit, offset = int(query["limit"][0]), int(query["offset"][0])
            limit = min([limit, *Pacs.cap])
            body = json.dumps(STUDIES[offset : offset + limit]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
        elif url.path.endswith("/instances/9.9.9"):
            boundary = "b0und4ry"
            body = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + DICOM
                + f"\r\n--{boundary}--\r\n".encode()
            )  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        else:
            body = b""
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


RATE = 8.0
"""The test config's rate_limit_per_second: high enough to keep the tests short, low enough to measure."""


@pytest.fixture
def client(a_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[DicomwebClient]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Pacs.seen_auth.clear()
    Pacs.arrivals.clear()
    Pacs.busy[:] = [0]
    Pacs.cap.clear()
    from devstack.airflow_env import include_copy

    include = include_copy(
        tmp_path / "include",
        source="pacs",
        page_size=2,
        rate_limit_per_second=RATE,
        database={"connect_timeout_seconds": 4, "statement_timeout_seconds": 4321},
    )
    config = include / "sources" / "pacs.yaml"
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["api"].update(qido_path="/rs", changes="none", timezone="UTC")
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEDSYNC_INCLUDE_DIR", str(include))
    host, port = server.server_address[:2]
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEDSYNC_PACS_API",
        json.dumps({"conn_type": "http", "host": f"http://{host}:{port}", "password": TOKEN}),
    )
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", connection_uri(a_db))
    with psycopg.connect(a_db, autocommit=True) as conn:
        migrate(conn)
    source = open_source(get_source_config("pacs"))
    with source.connect() as opened:
        assert isinstance(opened, DicomwebClient)
        yield opened
    server.shutdown()


def test_the_latest_study_gives_the_patient_attributes_over_pages(client: DicomwebClient) -> None:
    pages = list(client.iter_listing("subject"))
    items = [item for page in pages for item in page.items]
    names = {item["00100020"]["Value"][0]: item["00100010"]["Value"][0]["Alphabetic"] for item in items}
    assert names == {"P1": "Newest^Name", "P2": "Other^Patient Later"}
    assert all(a == f"Bearer {TOKEN}" for a in Pacs.seen_auth)
    # Paged by 2 (page_size): six studies took three full pages and one empty answer.
    assert len(Pacs.seen_auth) == 4
    versions = {item["_medsync"]["version"] for item in items}
    assert len(versions) == 1  # first seen together
    again = [item for page in client.iter_listing("subject") for item in page.items]
    assert {item["_medsync"]["version"] for item in again} == versions  # unchanged content: the kept version


def _gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals)]


def test_requests_are_paced_at_the_configs_rate_retries_included(client: DicomwebClient) -> None:
    Pacs.busy[:] = [1]  # the first request is answered 503: urllib3 retries it (after its backoff)
    pages = list(client.iter_listing("study"))
    assert sum(len(p.items) for p in pages) == len(STUDIES)
    assert len(Pacs.arrivals) == 5  # one refused, three pages, one empty answer
    # Slots are 1/RATE apart (a token bucket of rate_limit_per_second: no limiter was given). One
    # request may reach the server late and the next on time, so the span is measured, not each gap.
    span = Pacs.arrivals[-1] - Pacs.arrivals[0]
    assert span >= (len(Pacs.arrivals) - 1) / RATE * 0.95, _gaps(Pacs.arrivals)


def test_a_run_wide_limiter_paces_every_request_and_retry(client: DicomwebClient, a_db: str) -> None:
    from medsync.request_limit import DatabaseRequestLimiter

    source = open_source(get_source_config("pacs"))
    limiter = DatabaseRequestLimiter(lambda: psycopg.connect(a_db), "pacs", 50.0)
    Pacs.arrivals.clear()
    Pacs.busy[:] = [2]
    with limiter, source.connect(limiter) as paced:
        assert b"".join(paced.iter_file("1.2", "1.2.3", "9.9.9")) == DICOM
        list(paced.iter_listing("study"))
        # Every request the server saw claimed a slot of the source's limit in A's database.
        assert limiter.requests == len(Pacs.arrivals) == 2 + 1 + 4
    with psycopg.connect(a_db) as conn:
        claimed = conn.execute("SELECT count(*) FROM medsync.request_limit WHERE source_system = 'pacs'").fetchone()
    assert claimed == (1,)


def test_the_clients_database_session_has_the_configs_bounds(client: DicomwebClient) -> None:
    assert client.db.execute("SHOW statement_timeout").fetchone() == ("4321s",)
    assert client.db.info.get_parameters().get("connect_timeout") == "4"


def test_a_server_capping_its_pages_fails_a_full_listing_instead_of_truncating_it(client: DicomwebClient) -> None:
    Pacs.cap[:] = [1]  # page_size is 2: every page is short, and there is more after each
    with pytest.raises(SourceApiError, match=r"answered 1 items for limit=2 and has more .* at most 1"):
        list(client.iter_listing("study"))
    Pacs.cap.clear()
    Pacs.arrivals.clear()
    assert sum(len(p.items) for p in client.iter_listing("subject")) == 2
    # Six studies in pages of two end with an empty page; a short last page costs one more request.
    STUDIES.append(study("3.1", "Third^Patient", None, pid="P3"))
    try:
        Pacs.arrivals.clear()
        assert sum(len(p.items) for p in client.iter_listing("study")) == 7
        assert len(Pacs.arrivals) == 5
    finally:
        STUDIES.pop()


def test_wado_rs_file_is_streamed_out_of_its_multipart_answer(client: DicomwebClient) -> None:
    assert b"".join(client.iter_file("1.2", "1.2.3", "9.9.9")) == DICOM
    with pytest.raises(SourceApiError, match="HTTP 404"):
        b"".join(client.iter_file("1.2", "1.2.3", "8.8.8"))


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_multipart_first_part_whatever_the_chunking(size: int) -> None:
    boundary = b"xyz"
    body = b"preamble\r\n--xyz\r\nContent-Type: application/dicom\r\n\r\n" + DICOM + b"\r\n--xyz--\r\n"
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    assert b"".join(multipart_first_part(iter(chunks), boundary)) == DICOM
    with pytest.raises(SourceApiError, match="ended inside its part"):
        b"".join(multipart_first_part(iter(chunks[: len(chunks) // 2]), boundary))
