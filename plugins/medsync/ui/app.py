"""The medsync page's FastAPI app, mounted in Airflow's API server by ``medsync.ui.plugin``.

- ``GET /``: the page (static HTML and JS; it holds no data). Without a valid token it
  redirects to Airflow's login, which comes back here.
- ``GET /api/sources``: the sources whose DAG the user may read.
- ``GET /api/sources/{name}``: everything the page shows for one source (``queries.overview``).
- ``POST /api/search`` with ``{"q": ...}``: where a record stands, by source key or A's id, in
  the sources the user may read. POST, so that the term (it may be a patient's MRN) is in no
  URL: Airflow's access log records every request's path and query string.

Every API route answers 401 without a token (or with an expired one), 403 with a token
Airflow did not sign or for a source whose DAG the user may not read. Data comes from A's
database through each source's own connection, read-only, with a statement timeout
(``medsync.ui.database``); a database that fails or is too slow gives 503 with no details.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from medsync.config import SourceConfig, load_source_configs
from medsync.errors import ConfigError
from medsync.ui import queries
from medsync.ui.auth import can_read_dag, current_user, login_url, readable_dags
from medsync.ui.database import ConnectionMissingError, connect_readonly

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
NO_STORE = {"Cache-Control": "no-store"}
"""The figures change with every run, and pages of patients' records belong in no cache."""

User = Annotated[Any, Depends(current_user)]


class SearchRequest(BaseModel):
    q: str = Field(min_length=1, max_length=queries.MAX_SEARCH_TERM)
    """A source key or A's id."""


def _sources() -> list[SourceConfig]:
    try:
        return load_source_configs()
    except ConfigError as exc:
        log.error("medsync page: source configs unreadable: %s", exc)
        raise HTTPException(status_code=503, detail="medsync's source configs are unreadable") from exc


def _readable(user: Any) -> list[SourceConfig]:
    """The sources whose DAG ``user`` may read; 403 when there is none."""
    sources = _sources()
    allowed = readable_dags(user, [cfg.dag_id for cfg in sources])
    readable = [cfg for cfg in sources if cfg.dag_id in allowed]
    if not readable:
        raise HTTPException(status_code=403, detail="you may not read any medsync DAG")
    return readable


def _database_unavailable(source: str, exc: Exception) -> HTTPException:
    if isinstance(exc, ConnectionMissingError):
        log.error("medsync page: %s", exc)
        return HTTPException(status_code=503, detail=str(exc))
    # The error's class says what happened (timeout, refused, ...); its text may quote SQL: not shown.
    log.warning("medsync page: reading %s from A's database failed: %s", source, type(exc).__name__)
    return HTTPException(status_code=503, detail=f"A's database did not answer for {source} ({type(exc).__name__})")


def create_app() -> FastAPI:
    app = FastAPI(title="medsync", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        try:
            await current_user(request)
        except HTTPException:
            return RedirectResponse(login_url(str(request.url)), status_code=307)
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    @app.get("/api/sources")
    def sources(user: User) -> Response:
        from airflow.api_fastapi.app import API_ROOT_PATH

        body = {
            "airflow_root": API_ROOT_PATH,
            "sources": [{"name": c.name, "dag_id": c.dag_id, "description": c.description} for c in _readable(user)],
        }
        return JSONResponse(body, headers=NO_STORE)

    @app.get("/api/sources/{name}")
    def source(name: str, user: User) -> Response:
        cfg = next((c for c in _sources() if c.name == name), None)
        if cfg is None:
            raise HTTPException(status_code=404, detail=f"no source {name!r}")
        if not can_read_dag(user, cfg.dag_id):
            raise HTTPException(status_code=403, detail=f"you may not read {cfg.dag_id}")
        try:
            with connect_readonly(cfg.connections.db_conn_id) as conn:
                body = {"dag_id": cfg.dag_id, "synced": True, **queries.overview(conn, name, datetime.now(UTC))}
        except psycopg.errors.UndefinedTable:
            body = {"dag_id": cfg.dag_id, "source": name, "synced": False}  # no run has created medsync's tables
        except (psycopg.Error, ConnectionMissingError) as exc:
            raise _database_unavailable(name, exc) from exc
        return JSONResponse(body, headers=NO_STORE)

    @app.post("/api/search")
    def search(user: User, request: SearchRequest) -> Response:
        by_conn: dict[str, list[str]] = {}
        for cfg in _readable(user):
            by_conn.setdefault(cfg.connections.db_conn_id, []).append(cfg.name)
        results: list[dict[str, Any]] = []
        for conn_id, names in by_conn.items():
            try:
                with connect_readonly(conn_id) as conn:
                    results += queries.search(conn, names, request.q)
            except psycopg.errors.UndefinedTable:
                results.append({"sources": names, "states": [queries.NEVER_SEEN]})
            except (psycopg.Error, ConnectionMissingError) as exc:
                raise _database_unavailable(",".join(names), exc) from exc
        # The term is not echoed: it may be a patient's MRN, which the answer shows only masked.
        found = [r for r in results if queries.found(r)]
        return JSONResponse({"results": found or results[:1]}, headers=NO_STORE)

    return app
