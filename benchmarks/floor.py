"""The floor: what this machine allows for moving B's records into PostgreSQL at all.

Every page is fetched from the simulator (same windows, page size and parallelism as the
sync's pulls: one process per level, the instance level in the same time slices), decoded,
and each record COPYed raw, as ``(id, updated_at, the JSON text)``, into an UNLOGGED table
without indexes. No validation, mapping, staging or merge. The HTTP client is the standard
library's, over one keep-alive connection, and the next page is fetched while the previous
one is COPYed (the same overlap the pull has), so nothing here is slower than it must be.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import psycopg
from psycopg import sql

from medsync.sources.rest.client import format_moment

TABLE = "bench_floor_raw"


def create_table(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    conn.execute(
        sql.SQL("CREATE UNLOGGED TABLE {} (resource text, id text, updated_at timestamptz, body text)").format(
            sql.Identifier(TABLE)
        )
    )


def drop_table(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))


def raw_pages(
    base_url: str, api_key: str, resource: str, since: str, until: str, page_size: int
) -> Iterator[list[Any]]:
    """B's pages of one window, decoded, over one keep-alive connection (no retries: a benchmark)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    params = {"updated_since": since, "updated_before": until, "include_deleted": "true", "limit": str(page_size)}
    cursor: str | None = None
    try:
        while True:
            query = urlencode({**params, **({"cursor": cursor} if cursor else {})})
            conn.request("GET", f"{url.path}/{resource}?{query}", headers={"X-API-Key": api_key})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /{resource}: HTTP {response.status}: {body[:200]!r}")
            page = json.loads(body)
            yield page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return
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
    api_key: str,
    resource: str,
    since: datetime,
    until: datetime,
    page_size: int,
    commit_rows: int,
) -> dict[str, Any]:
    """One floor process: a window of one resource, fetched and COPYed raw. Runs in a worker."""
    started = time.perf_counter()
    copy = sql.SQL("COPY {} (resource, id, updated_at, body) FROM STDIN").format(sql.Identifier(TABLE))
    records = 0
    pages = fetched_ahead(
        raw_pages(
            base_url, api_key, resource, format_moment(since, "rfc3339"), format_moment(until, "rfc3339"), page_size
        )
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        exhausted = False
        while not exhausted:
            # Commits as often as the pull's staging does.
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy) as out:
                in_chunk = 0
                for page in pages:
                    for record in page:
                        out.write_row((resource, record["id"], record["updated_at"], json.dumps(record)))
                    in_chunk += len(page)
                    records += len(page)
                    if in_chunk >= commit_rows:
                        break
                else:
                    exhausted = True
    return {"resource": resource, "records": records, "seconds": time.perf_counter() - started}
