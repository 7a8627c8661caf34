"""The naive baseline: the sync as a first version would write it.

Level after level, page after page: each record is validated and mapped by the same parser
the sync uses, its parent's id is looked up (one query per page), and the page is upserted
with ``PostgresHook.insert_rows(replace=True)``, i.e. one ``INSERT ... ON CONFLICT DO UPDATE``
per row (psycopg 3's executemany pipelines them, 1,000 rows per commit, a new connection per
call). No staging, no set-based merge. It is only fit for a first load of plain data (no
tombstones, every parent present), which is all the benchmark gives it.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from psycopg import sql

from medsync.config import LEVELS, get_source_config
from medsync.levels import spec, staged_columns
from medsync.schema import A_SCHEMA
from medsync.sources import open_source


def load(*, since: datetime, until: datetime) -> dict[str, Any]:
    """Loads every level's window into A the naive way; returns records and seconds per level. Runs in a worker."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from uuid_utils import uuid7

    from medsync.tasks import record_parser

    cfg = get_source_config("b")
    source = open_source(cfg)
    hook = PostgresHook(postgres_conn_id=cfg.connections.db_conn_id)
    client = source.connect()
    parser = record_parser(cfg)
    lookups = hook.get_conn()
    out: dict[str, Any] = {}
    for level in LEVELS:
        started = time.perf_counter()
        s = spec(level)
        content = staged_columns(level)[1:] if s.parent_level else staged_columns(level)
        fields = [
            "id",
            "source_system",
            "source_key",
            *([s.parent_fk] if s.parent_fk else []),
            *content,
            "source_updated_at",
        ]
        records = 0
        for page in client.iter_pages(level, since, until):
            parsed = [parser.parse(level, raw) for raw in page.items]
            live = [r for r in parsed if not r.deleted]
            records += len(page.items)
            parents: dict[str, str] = {}
            if s.parent_level:
                parent = spec(s.parent_level)
                keys = list({r.values[0] for r in live})
                lookup = sql.Identifier(source.parent_link(level).column)
                with lookups.cursor() as cur:
                    cur.execute(
                        sql.SQL("SELECT {}, id::text FROM {} WHERE source_system = 'b' AND {} = ANY(%s)").format(
                            lookup, sql.Identifier(A_SCHEMA, parent.table), lookup
                        ),
                        (keys,),
                    )
                    parents = dict(cur.fetchall())
                rows = [
                    (str(uuid7()), "b", r.source_key, parents[r.values[0]], *r.values[1:], r.updated_at)
                    for r in live
                    if r.values[0] in parents
                ]
            else:
                rows = [(str(uuid7()), "b", r.source_key, *r.values, r.updated_at) for r in live]
            hook.insert_rows(
                f"{A_SCHEMA}.{s.table}",
                rows,
                target_fields=fields,
                replace=True,
                replace_index=["source_system", "source_key"],
            )
        out[level] = {"records": records, "seconds": time.perf_counter() - started}
    lookups.close()
    return out
