"""The floor: what this machine allows for moving a source's records into PostgreSQL at all.

Every page is fetched from the simulator (same windows, page size and parallelism as the
sync's pulls: one process per level, the instance level in the same time slices), decoded,
and each record COPYed raw, as ``(key, version, the JSON text)``, into an UNLOGGED table
without indexes. No validation, mapping, staging or merge. The HTTP client is the standard
library's, over one keep-alive connection, and the next page is fetched while the previous
one is COPYed (the same overlap the pull has), so nothing here is slower than it must be.

The source's API is spoken as its config's ``api:`` section declares it (read as plain YAML,
not through medsync's spec: the floor must not change with the code under test): the window's
parameters and their format, the fixed parameters, where a page's records are, and its paging,
either a cursor in the body (B) or a ``Link: <...>; rel="next"`` header (C, whose next-page
links carry the snapshot its first page pinned).
"""

from __future__ import annotations

import http.client
import json
import operator
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import psycopg
from psycopg import sql

from medsync.sources.rest.client import format_moment

TABLE = "bench_floor_raw"
VERSION_TYPES = {"rfc3339": "timestamptz", "epoch_millis": "bigint", "epoch_seconds": "bigint"}
"""The version column's type per ``api.version.format``: the version as the source writes it, typed by PostgreSQL."""
NEXT_LINK = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?')


def create_table(conn: psycopg.Connection, version_format: str) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    conn.execute(
        sql.SQL("CREATE UNLOGGED TABLE {} (resource text, key text, version {}, body text)").format(
            sql.Identifier(TABLE), sql.SQL(VERSION_TYPES[version_format])
        )
    )


def drop_table(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))


def dotted(document: Any, path: str | None) -> Any:
    """The value at a dotted JSON path (``data``, ``object.bucket``), as the source configs write them;
    the document itself for no path (a page that is a bare array)."""
    for part in path.split(".") if path else ():
        document = document[part]
    return document


def getter(path: str) -> Callable[[Any], Any]:
    """``dotted`` for one path, made once: a plain item lookup where the path has one part."""
    return operator.itemgetter(path) if "." not in path else lambda document: dotted(document, path)


def raw_pages(
    base_url: str,
    headers: dict[str, str],
    api: dict[str, Any],
    endpoint: str,
    since: datetime,
    until: datetime,
    page_size: int,
) -> Iterator[list[Any]]:
    """The pages of one window of one list endpoint, decoded, over one keep-alive connection (no retries)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    window, paging = api["window"], api["paging"]
    params = {
        **api.get("params", {}),
        window["since_param"]: format_moment(since, window["format"]),
        window["until_param"]: format_moment(until, window["format"], round_up=True),
        paging["page_size_param"]: str(page_size),
    }
    target = f"{url.path}{endpoint}?{urlencode(params)}"
    try:
        while True:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {target}: HTTP {response.status}: {body[:200]!r}")
            page = json.loads(body)
            yield dotted(page, api.get("records_path"))
            if paging["type"] == "cursor":
                cursor = dotted(page, paging["cursor_path"])
                if cursor is None:
                    return
                target = f"{url.path}{endpoint}?{urlencode({**params, paging['cursor_param']: cursor})}"
            elif paging["type"] == "link_header":
                found = NEXT_LINK.search(response.getheader("Link") or "")
                if found is None:
                    return
                link = urlsplit(found.group(1))  # absolute, on the same server: the connection is kept
                target = f"{link.path}?{link.query}"
            else:
                raise ValueError(f"paging {paging['type']!r} is not one the floor speaks")
    finally:
        conn.close()


def fetched_ahead(pages: Iterator[list[Any]], depth: int = 2) -> Iterator[list[Any]]:
    """``pages`` produced by a thread up to ``depth`` ahead of the consumer.

    Its own, not ``medsync.staging.read_ahead``: the floor must not change with the code under
    test (``--plugins``). A benchmark, so no early-stop handling: an error ends the process.
    """
    handoff: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for page in pages:
                handoff.put((True, page))
            handoff.put((False, None))
        except Exception as exc:  # noqa: BLE001 (raised by the consumer)
            handoff.put((False, exc))

    threading.Thread(target=produce, name="floor-fetch", daemon=True).start()
    while True:
        more, value = handoff.get()
        if not more:
            if value is not None:
                raise value
            return
        yield value


def pull_raw(
    *,
    dsn: str,
    base_url: str,
    headers: dict[str, str],
    api: dict[str, Any],
    endpoint: str,
    since: datetime,
    until: datetime,
    page_size: int,
    commit_rows: int,
) -> dict[str, Any]:
    """One floor process: a window of one list endpoint, fetched and COPYed raw. Runs in a worker."""
    started = time.perf_counter()
    copy = sql.SQL("COPY {} (resource, key, version, body) FROM STDIN").format(sql.Identifier(TABLE))
    key, version = getter(api["key"]["path"]), getter(api["version"]["path"])
    records = 0
    pages = fetched_ahead(raw_pages(base_url, headers, api, endpoint, since, until, page_size))
    with psycopg.connect(dsn, autocommit=True) as conn:
        exhausted = False
        while not exhausted:
            # Commits as often as the pull's staging does.
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy) as out:
                in_chunk = 0
                for page in pages:
                    for record in page:
                        out.write_row((endpoint, key(record), version(record), json.dumps(record)))
                    in_chunk += len(page)
                    records += len(page)
                    if in_chunk >= commit_rows:
                        break
                else:
                    exhausted = True
    return {"endpoint": endpoint, "records": records, "seconds": time.perf_counter() - started}
