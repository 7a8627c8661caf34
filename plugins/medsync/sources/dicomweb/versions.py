"""A record's version when the PACS gives none: when medsync first saw its current content.

See docs/dicomweb-mapping.md, "Versions". ``medsync.content_version`` keeps, per record, the hash
of the attributes read for it and when that hash was first seen. :func:`assign` versions one page:
one statement that keeps the time of an unchanged hash and stamps a new or changed one (or one
whose record has a tombstone at least as new: a record back after a deletion) with the time of
the pull's statement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from medsync.sources.dicomweb.tags import READ

_ASSIGN = """
WITH page AS (
    SELECT * FROM unnest(%(keys)s::text[], %(hashes)s::text[]) AS p(source_key, content_hash)
), written AS (
    INSERT INTO medsync.content_version AS v (source_system, level, source_key, content_hash, first_seen_at)
    SELECT %(src)s, %(level)s, source_key, content_hash, statement_timestamp() FROM page
    ON CONFLICT (source_system, level, source_key) DO UPDATE
    SET content_hash = excluded.content_hash, first_seen_at = excluded.first_seen_at
    WHERE v.content_hash <> excluded.content_hash
       OR EXISTS (SELECT 1 FROM medsync.tombstone t
                  WHERE t.source_system = v.source_system AND t.level = v.level
                    AND t.source_key = v.source_key AND t.source_updated_at >= v.first_seen_at)
    RETURNING source_key, first_seen_at
)
SELECT p.source_key, coalesce(w.first_seen_at, v.first_seen_at)
FROM page p
LEFT JOIN written w ON w.source_key = p.source_key
LEFT JOIN medsync.content_version v
       ON v.source_system = %(src)s AND v.level = %(level)s AND v.source_key = p.source_key
"""


def content_hash(level: str, item: dict[str, Any]) -> str:
    """SHA-256 of the values of the attributes read for ``level``, in tag order."""
    tags = sorted(READ[level])
    values = [item.get(tag, {}).get("Value") if isinstance(item.get(tag), dict) else None for tag in tags]
    body = json.dumps([tags, values], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def assign(
    conn: psycopg.Connection, source: str, level: str, keyed: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, datetime]:
    """The version of each ``(source_key, item)`` of a page (a key listed twice: its last item counts).

    ``conn`` is in autocommit mode: the kept versions are committed with the page, so a re-run of
    the pull finds them (a pull that fails later leaves versions that are still true).
    """
    latest = {key: content_hash(level, item) for key, item in keyed}
    if not latest:
        return {}
    rows = conn.execute(
        _ASSIGN, {"src": source, "level": level, "keys": list(latest), "hashes": list(latest.values())}
    ).fetchall()
    return {key: when for key, when in rows}
