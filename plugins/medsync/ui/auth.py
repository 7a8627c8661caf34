"""Who may see what on the medsync page: Airflow's own token, checked by Airflow's auth manager.

Apps that plugins mount in the API server are not behind Airflow's auth, so every request is
checked here, as Airflow's REST API checks its own: the token is the ``Authorization: Bearer``
header if there is one, else the ``_token`` cookie the UI's login sets (the page runs in the
UI's iframe, same origin, so the browser sends it). No token or an expired one is 401, a token
Airflow did not sign is 403 (``resolve_user_from_token``). A source's data is shown only to a
user whom the auth manager lets read that source's DAG and its runs.

Airflow is imported inside the functions: the plugin folder's modules are imported by every
Airflow process, and only the API server needs these.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

TOKEN_COOKIE = "_token"  # noqa: S105 (a cookie's name, not a secret)
"""``airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN``."""


def request_token(request: Request) -> str | None:
    """The bearer token of the request, else the UI's cookie."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE)


async def current_user(request: Request) -> Any:
    """The user the request's token names; raises 401/403 like Airflow's API."""
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    return await resolve_user_from_token(request_token(request))


def readable_dags(user: Any, dag_ids: list[str]) -> set[str]:
    """Those of ``dag_ids`` whose DAG and runs the auth manager lets ``user`` read.

    Each DAG is described as Airflow's own API describes it (``requires_access_dag``): with its
    team, the team of its bundle, all looked up in one query. An auth manager may decide by team
    (SimpleAuthManager in multi-team mode does, and lets anyone read a DAG whose team it is not told).
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    manager = get_auth_manager()
    teams = DagModel.get_dag_id_to_team_name_mapping(dag_ids)  # a DAG without a team is left out
    readable = set()
    for dag_id in dag_ids:
        details = DagDetails(id=dag_id, team_name=teams.get(dag_id))
        if manager.is_authorized_dag(method="GET", details=details, user=user) and manager.is_authorized_dag(
            method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user
        ):
            readable.add(dag_id)
    return readable


def can_read_dag(user: Any, dag_id: str) -> bool:
    """Whether the auth manager lets ``user`` read the DAG and its runs (``readable_dags``)."""
    return dag_id in readable_dags(user, [dag_id])


def login_url(next_url: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)
