"""Protocol ``b_rest``: service B's REST export API (``/api/v1``).

Contract: ``shared/contracts/source-b/`` (OpenAPI plus README). What medsync relies on:

- one paged list endpoint per level (``/patients``, ``/studies``, ``/series``,
  ``/images``) filtered by ``[updated_since, updated_before)`` on ``updated_at``,
  ordered by ``(updated_at, id)``, cursor-paged (``next_cursor`` null on the last page);
- ``include_deleted=true`` returns soft-deleted records as tombstones
  (``id``, ``updated_at``, ``deleted: true``);
- ``GET /<resource>/<id>`` for one record (404 when unknown) and ``GET /counts``
  for live records per resource, used for reconciliation;
- authentication with the ``X-API-Key`` header; 429 carries ``Retry-After``;
  5xx and dropped connections are transient.

Modules:

- ``client``: :class:`~medsync.sources.b_rest.client.BApiClient`, the HTTP client
  (no Airflow imports; the Airflow hook is ``medsync.hooks.source_api``);
- ``records``: pydantic models of B's records.

Nothing heavy is imported here: the DAG factory may import this package at parse time.
"""

from __future__ import annotations

RESOURCES: dict[str, str] = {
    "subject": "patients",
    "study": "studies",
    "sequence": "series",
    "instance": "images",
}
"""A's level (``medsync.config.LEVELS``) -> B's resource (the path segment of its list endpoint)."""
