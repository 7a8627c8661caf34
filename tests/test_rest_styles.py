"""The six API styles of docs/rest-sources.md, each walked by RestClient against a small real server
on 127.0.0.1 that speaks the style, configured with exactly the ``api:`` section the docs show.

Each server holds the same patients, some before, inside and after the window, and pages them as
its framework does: Django REST Framework's page numbers with an absolute ``next``, JSON:API's
``links.next`` left out on the last page, Spring Data REST's HAL with ``_embedded`` left out of an
empty page, OData's ``$filter`` window and ``@odata.nextLink``, GitHub's ``Link`` header with a
lower bound only, Stripe's ``starting_after`` with ``has_more``. Every page is also parsed with
the docs' fields, so the paths the docs show are the ones such a server sends.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from medsync.mapping import parse_mapping
from medsync.sources import validate_api
from medsync.sources.base import Buckets, StagedRecord
from medsync.sources.rest.client import RestClient
from medsync.sources.rest.records import RestRecordParser
from medsync.sources.rest.spec import RestApi
from tests.test_docs_examples import ROOT, yaml_blocks
from tests.test_rest_client import Reply, Seen, Stub

SECRET = "style-secret-9Qx"
LOGIN = "medsync"
T0 = datetime(2026, 11, 3, tzinfo=UTC)
SINCE, UNTIL = T0, T0 + timedelta(hours=1)
PAGE_SIZE = 3


@dataclass(frozen=True)
class Patient:
    n: int
    modified: datetime

    @property
    def mrn(self) -> str:
        return f"MRN{self.n:04d}"

    @property
    def sex(self) -> str:
        return "F" if self.n % 2 else "M"


# Before the window, nine inside it (two at the same minute), and some at or after its end.
PATIENTS = [
    Patient(n, T0 + timedelta(minutes=m))
    for n, m in enumerate([-5, 0, 5, 10, 10, 20, 30, 40, 50, 59, 60, 75, 80, 95, 110, 130], start=1)
]
IN_WINDOW = [p for p in PATIENTS if SINCE <= p.modified < UNTIL]
MAPPING = parse_mapping(
    {
        "source": "style",
        "subject": [{"field": "sex", "columns": ["sex"], "values": {"F": "F", "M": "M", None: None}}],
        "study": [{"field": "status", "columns": ["status"], "values": {"done": "COMPLETED"}}],
        "sequence": [
            {"field": "modality", "columns": ["modality"], "values": {"MR": "MR"}},
            {"field": "body_part", "columns": ["body_part", "laterality"], "values": {"HEAD": ["HEAD", None]}},
        ],
    },
    "test",
)


def docs_api(heading: str) -> RestApi:
    """The ``api:`` section the docs show under ``### <heading>``."""
    text = (ROOT / "docs" / "rest-sources.md").read_text(encoding="utf-8")
    start = text.index(f"\n### {heading}\n")
    line = text.count("\n", 0, start) + 2
    block = next(block for at, block in yaml_blocks("docs/rest-sources.md") if at > line)
    api = validate_api("rest", block["api"], f"docs/rest-sources.md ### {heading}")
    assert isinstance(api, RestApi)
    return api


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def window(since: datetime, until: datetime | None) -> list[Patient]:
    """The server's side of a window: sorted by version, then id."""
    return sorted(
        (p for p in PATIENTS if since <= p.modified and (until is None or p.modified < until)),
        key=lambda p: (p.modified, p.n),
    )


@pytest.fixture
def server() -> Iterator[Stub]:
    with Stub.serving() as s:
        yield s


def walk(
    server: Stub, api: RestApi, serve: Callable[[Seen], Reply], *, login: str | None = None, level: str = "subject"
) -> list[str]:
    """The keys of ``level``'s records in [SINCE, UNTIL), in the order read; every record parsed as staged."""
    server.script = serve
    with RestClient(
        server.root + api.base_path,
        api,
        SECRET,
        login=login,
        page_size=PAGE_SIZE,
        timeout=5.0,
        max_attempts=1,
        max_backoff_seconds=1.0,
        rate_limit_per_second=None,
    ) as client:
        pages = list(client.iter_pages(level, SINCE, UNTIL))
    parser = RestRecordParser(api, MAPPING, Buckets("bucket", frozenset({"bucket"})))
    staged = [outcome for page in pages for outcome in parser.parse_page(level, page)]
    assert all(isinstance(outcome, StagedRecord) and not outcome.deleted for outcome in staged), staged
    return [outcome.source_key for outcome in staged if isinstance(outcome, StagedRecord)]


def expect_bearer(seen: Seen) -> None:
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"


# --- Django REST Framework: PageNumberPagination, an absolute next link, integer ids ----------------------


def test_django_rest_framework(server: Stub) -> None:
    def serve(seen: Seen) -> Reply:
        expect_bearer(seen)
        assert seen.path == "/api/patients/" and seen.query["ordering"] == "modified,id"
        rows = window(moment(seen.query["modified__gte"]), moment(seen.query["modified__lt"]))
        page, size = int(seen.query.get("page", "1")), int(seen.query["page_size"])
        more = page * size < len(rows)
        return Reply(
            body={
                "count": len(rows),
                "next": f"{server.root}/api/patients/?{urlencode({**seen.query, 'page': page + 1})}" if more else None,
                "previous": None,
                "results": [
                    {
                        "id": p.n,
                        "modified": iso(p.modified),
                        "is_deleted": False,
                        "mrn": p.mrn,
                        "sex": p.sex,
                        "name": "Kim, Minji",
                        "birth_date": "1984-06-17",
                    }
                    for p in rows[(page - 1) * size : page * size]
                ],
            }
        )

    keys = walk(server, docs_api("Django REST Framework"), serve)
    assert keys == [str(p.n) for p in IN_WINDOW]
    assert [s.query.get("page") for s in server.requests] == [None, "2", "3"]


# --- JSON:API: links.next left out on the last page ------------------------------------------------------------


def test_json_api(server: Stub) -> None:
    def serve(seen: Seen) -> Reply:
        expect_bearer(seen)
        assert seen.path == "/patients" and seen.query["sort"] == "updated-at,id"
        rows = window(moment(seen.query["filter[updated-since]"]), moment(seen.query["filter[updated-before]"]))
        at, size = int(seen.query.get("page[cursor]", "0")), int(seen.query["page[size]"])
        links = {"self": f"{server.root}/patients"}
        if at + size < len(rows):
            links["next"] = f"{server.root}/patients?{urlencode({**seen.query, 'page[cursor]': at + size})}"
        return Reply(
            body={
                "data": [
                    {
                        "type": "patients",
                        "id": f"p-{p.n}",
                        "attributes": {
                            "mrn": p.mrn,
                            "family-name": "Kim",
                            "given-name": None,
                            "sex": p.sex,
                            "updated-at": iso(p.modified),
                            "deleted-at": None,
                        },
                    }
                    for p in rows[at : at + size]
                ],
                "links": links,
            }
        )

    keys = walk(server, docs_api("JSON:API"), serve)
    assert keys == [f"p-{p.n}" for p in IN_WINDOW]
    assert len(server.requests) == math.ceil(len(IN_WINDOW) / PAGE_SIZE)


# --- Spring Data REST: HAL, page numbers from 0, _embedded left out of an empty page ---------------------------


def spring(server: Stub) -> Callable[[Seen], Reply]:
    def serve(seen: Seen) -> Reply:
        expected = base64.b64encode(f"{LOGIN}:{SECRET}".encode()).decode()
        assert seen.headers["Authorization"] == f"Basic {expected}"
        assert seen.path == "/patients/search/modified" and seen.query["sort"] == "lastModified,asc"
        rows = window(moment(seen.query["from"]), moment(seen.query["to"]))
        page, size = int(seen.query["page"]), int(seen.query["size"])
        chunk = rows[page * size : (page + 1) * size]
        body: dict[str, Any] = {
            "_links": {"self": {"href": f"{server.root}{seen.path}"}},
            "page": {"size": size, "totalElements": len(rows), "totalPages": math.ceil(len(rows) / size),
                     "number": page},
        }  # fmt: skip
        if chunk:  # Spring Data REST leaves _embedded out altogether when there is nothing in it
            body["_embedded"] = {
                "patients": [
                    {
                        "id": p.n,
                        "lastModified": p.modified.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                        "mrn": p.mrn,
                        "sex": p.sex,
                    }
                    for p in chunk
                ]
            }
        return Reply(body=body)

    return serve


def test_spring_data_rest(server: Stub) -> None:
    keys = walk(server, docs_api("Spring Data REST"), spring(server), login=LOGIN)
    assert keys == [str(p.n) for p in IN_WINDOW]
    assert [s.query["page"] for s in server.requests] == ["0", "1", "2"]


def test_spring_data_rest_empty_window(server: Stub) -> None:
    api = docs_api("Spring Data REST")
    server.script = spring(server)
    with RestClient(server.root, api, SECRET, login=LOGIN, page_size=PAGE_SIZE, timeout=5.0, max_attempts=1,
                    max_backoff_seconds=1.0) as client:  # fmt: skip
        assert list(client.iter_pages("subject", T0 - timedelta(days=2), T0 - timedelta(days=1))) == []
    assert len(server.requests) == 1


# --- OData: the window in $filter, server-driven paging with @odata.nextLink ----------------------------------

ODATA_FILTER = re.compile(r"^Modified ge (\S+) and Modified lt (\S+)$")


def test_odata(server: Stub) -> None:
    server_page = 4  # server-driven: the client sends no page size

    def serve(seen: Seen) -> Reply:
        expect_bearer(seen)
        assert seen.path == "/odata/Patients" and seen.query["$orderby"] == "Modified,Id"
        bounds = ODATA_FILTER.match(seen.query["$filter"])
        assert bounds, seen.query["$filter"]
        rows = window(moment(bounds[1]), moment(bounds[2]))
        at = int(seen.query.get("$skiptoken", "0"))
        body: dict[str, Any] = {
            "@odata.context": f"{server.root}/odata/$metadata#Patients",
            "value": [
                {
                    "@odata.etag": f'W/"{p.n}"',
                    "Id": p.n,
                    "Modified": iso(p.modified),
                    "Mrn": p.mrn,
                    "DisplayName": "Kim, Minji",
                    "Sex": p.sex,
                }
                for p in rows[at : at + server_page]
            ],
        }
        if at + server_page < len(rows):  # left out on the last page
            body["@odata.nextLink"] = f"{server.root}/odata/Patients?{urlencode({**seen.query, '$skiptoken': at + 4})}"
        return Reply(body=body)

    keys = walk(server, docs_api("OData"), serve)
    assert keys == [str(p.n) for p in IN_WINDOW]
    assert [s.query.get("$skiptoken") for s in server.requests] == [None, "4", "8"]
    assert server.requests[0].query["$filter"] == (
        "Modified ge 2026-11-03T00:00:00.000000Z and Modified lt 2026-11-03T01:00:00.000000Z"
    )


# --- GitHub: a bare array, Link header, since only ------------------------------------------------------------


def github(server: Stub) -> Callable[[Seen], Reply]:
    def serve(seen: Seen) -> Reply:
        expect_bearer(seen)
        assert seen.path == "/patients" and "until" not in seen.query and "before" not in seen.query
        assert (seen.query["sort"], seen.query["direction"], seen.query["state"]) == ("updated", "asc", "all")
        rows = window(moment(seen.query["since"]), None)  # updated at or after since: no upper bound
        page, size = int(seen.query.get("page", "1")), int(seen.query["per_page"])
        last = math.ceil(len(rows) / size)
        links = []
        if page < last:
            links.append(f'<{server.root}/patients?{urlencode({**seen.query, "page": page + 1})}>; rel="next"')
        links.append(f'<{server.root}/patients?{urlencode({**seen.query, "page": last})}>; rel="last"')
        records = [
            {"id": p.n, "node_id": f"P_{p.n:04d}", "updated_at": iso(p.modified), "mrn": p.mrn, "sex": p.sex}
            for p in rows[(page - 1) * size : page * size]
        ]
        return Reply(body=records, headers={"Link": ", ".join(links)})

    return serve


def test_github_link_header_with_since_only_stops_at_until(server: Stub) -> None:
    keys = walk(server, docs_api("GitHub-style `Link` headers"), github(server))
    assert keys == [f"P_{p.n:04d}" for p in IN_WINDOW]  # those at or after until were dropped
    listed = len(window(SINCE, None))
    assert math.ceil(listed / PAGE_SIZE) == 5
    assert [s.query.get("page") for s in server.requests] == [None, "2", "3", "4"]  # page 4 reached until


def test_github_link_header_unsorted_reads_to_the_end(server: Stub) -> None:
    api = docs_api("GitHub-style `Link` headers").model_copy(update={"order": "unsorted"})
    keys = walk(server, api, github(server))
    assert keys == [f"P_{p.n:04d}" for p in IN_WINDOW]
    assert len(server.requests) == 5


# --- Stripe: newest first, starting_after the last record, has_more ------------------------------------------------


def test_stripe_last_record_cursor(server: Stub) -> None:
    def serve(seen: Seen) -> Reply:
        expect_bearer(seen)
        assert seen.path == "/v1/customers"
        since = datetime.fromtimestamp(int(seen.query["created[gte]"]), UTC)
        until = datetime.fromtimestamp(int(seen.query["created[lt]"]), UTC)
        rows = list(reversed(window(since, until)))  # Stripe lists newest first
        ids = [f"cus_{p.n:04d}" for p in rows]
        after = seen.query.get("starting_after")
        at = ids.index(after) + 1 if after else 0
        size = int(seen.query["limit"])
        return Reply(
            body={
                "object": "list",
                "url": "/v1/customers",
                "has_more": at + size < len(rows),
                "data": [
                    {
                        "id": f"cus_{p.n:04d}",
                        "object": "customer",
                        "created": int(p.modified.timestamp()),
                        "name": "Kim, Minji",
                        "metadata": {"mrn": p.mrn, "sex": p.sex},
                    }
                    for p in rows[at : at + size]
                ],
            }
        )

    keys = walk(server, docs_api("Stripe-style cursors"), serve)
    assert keys == [f"cus_{p.n:04d}" for p in reversed(IN_WINDOW)]
    assert [s.query.get("starting_after") for s in server.requests] == [
        None,
        f"cus_{IN_WINDOW[-3].n:04d}",
        f"cus_{IN_WINDOW[-6].n:04d}",
    ]
