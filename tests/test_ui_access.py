"""Who sees what on the medsync page, per source's DAG, with Airflow's own SimpleAuthManager.

SimpleAuthManager's roles are global (a viewer reads every DAG); what it scopes per DAG is
the team, in multi-team mode: a DAG belongs to its bundle's team, a user to the teams of the
users config, and a user of one team may not read another team's DAGs. So Airflow runs here
in that mode, in this process, on a migrated metadata database where ``medsync_b``'s bundle
belongs to team ``imaging_b`` and ``medsync_c``'s and ``medsync_pacs``'s bundle to
``imaging_c``; users log in through SimpleAuthManager's own login (their tokens are its JWTs),
and the page's FastAPI app (``medsync.ui.app``, nothing of it stubbed) answers them through a
TestClient, wrapped in Airflow's access-log middleware as the API server wraps it. A is a
real PostgreSQL database holding B's rows (a sync of ``tests.test_merge``), C's and a PACS's.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from tests.airflow_stack import migrated_metadata_db, sqlalchemy_url
from tests.conftest import RUN_TAG, connection_uri, create_database, drop_database
from tests.test_merge import Sync, full_tree
from tests.test_ui_queries import PACS_PHI, insert_pacs_rows

USERS = {"b_reader": "viewer:imaging_b", "c_reader": "viewer:imaging_c", "admin": "admin"}
"""SimpleAuthManager users (``name:role[:team]``): a viewer of one team each, and an admin."""
TEAMS = {"imaging_b": ("medsync_b",), "imaging_c": ("medsync_c", "medsync_pacs")}
"""Each team's bundle and its DAGs."""
C_SUBJECT, C_STUDY = "3f1c2a9e-0b7d-4c1e-9a55-6a8a0c1d2e01", "7a2b4c6d-8e0f-4a1b-9c3d-5e7f9a1b3c5d"
"""C's keys (uuids, as C sends them)."""


def _assign_teams() -> None:
    """Airflow's rows for the teams: a team per bundle, the DAGs in their bundles (as the dag processor writes them)."""
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.team import Team
    from airflow.utils.session import create_session

    with create_session() as session:
        for team_name, dag_ids in TEAMS.items():
            team = Team(name=team_name)
            bundle = DagBundleModel(name=f"{team_name}_dags")
            bundle.teams.append(team)
            session.add_all([team, bundle])
            session.flush()
            session.add_all(DagModel(dag_id=d, bundle_name=bundle.name, fileloc=f"/dags/{d}.py") for d in dag_ids)


@pytest.fixture(scope="module")
def airflow_with_teams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Airflow in multi-team mode on a metadata database of its own; yields the users' passwords."""
    from airflow import settings
    from airflow.api_fastapi.app import create_auth_manager, purge_cached_app

    name = f"airflow_{RUN_TAG}_ui_access"
    migrated_metadata_db(name)
    passwords = {user: secrets.token_hex(8) for user in USERS}
    pw_file = tmp_path_factory.mktemp("ui-access") / "passwords.json"
    pw_file.write_text(json.dumps(passwords))
    previous_db = settings.SQL_ALCHEMY_CONN
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")
        env.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                   "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")  # fmt: skip
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ",".join(f"{u}:{r}" for u, r in USERS.items()))
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(pw_file))
        env.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32))
        settings.dispose_orm()
        settings.SQL_ALCHEMY_CONN = sqlalchemy_url(name)
        settings.configure_orm()
        purge_cached_app()
        try:
            _assign_teams()
            create_auth_manager()
            yield passwords
        finally:
            purge_cached_app()
            settings.dispose_orm()
            settings.SQL_ALCHEMY_CONN = previous_db
            settings.configure_orm()
            drop_database(name)


def _insert_c_rows(conn: psycopg.Connection) -> None:
    """A subject and a study of C, and one of C's records held back."""
    subject_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO imaging.subject (id, source_system, source_key, patient_code, source_updated_at)"
        " VALUES (%s, 'c', %s, 'MRN-C-1', now())",
        (subject_id, C_SUBJECT),
    )
    conn.execute(
        "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status, source_updated_at)"
        " VALUES (%s, %s, 'c', %s, '1.2.840.99.1', 'COMPLETED', now())",
        (uuid.uuid4(), subject_id, C_STUDY),
    )
    conn.execute(
        "INSERT INTO medsync.quarantine (source_system, level, source_key, source_updated_at, reason, payload)"
        " VALUES ('c', 'sequence', 'c0ffee00-0000-4000-8000-000000000001', now(), 'modality: unknown value', '{}')"
    )


@pytest.fixture(scope="module")
def a_with_rows(a_template_db: str) -> Iterator[str]:
    """A's database with B's, C's and the PACS's rows; the page's connection (medsync_a_db) points at it."""
    name = f"medsync_ui_access_{RUN_TAG}"
    dsn = create_database(name, template=a_template_db)
    sync = Sync(dsn)
    try:
        sync.run(**full_tree())
        _insert_c_rows(sync.conn)
        insert_pacs_rows(sync.conn)
        sync.conn.close()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", connection_uri(dsn))
            yield dsn
    finally:
        sync.conn.close()
        drop_database(name)


class Page:
    """The page's app as the API server serves it (behind Airflow's access log), and its users."""

    def __init__(self, passwords: dict[str, str]) -> None:
        from airflow.api_fastapi.common.http_access_log import HttpAccessLogMiddleware

        from medsync.ui.app import create_app

        self.client = TestClient(HttpAccessLogMiddleware(create_app()))
        self.passwords = passwords
        self.tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        """A token from SimpleAuthManager's own login, as ``POST /auth/token`` gives it."""
        from airflow.api_fastapi.auth.managers.simple.datamodels.login import LoginBody
        from airflow.api_fastapi.auth.managers.simple.services.login import SimpleAuthManagerLogin

        if user not in self.tokens:
            body = LoginBody(username=user, password=self.passwords[user])
            self.tokens[user] = SimpleAuthManagerLogin.create_token(body)
        return self.tokens[user]

    def get(self, path: str, user: str) -> Any:
        return self.client.get(path, headers={"Authorization": f"Bearer {self.token(user)}"})

    def search(self, term: str, user: str) -> Any:
        return self.client.post(
            "/api/search", json={"q": term}, headers={"Authorization": f"Bearer {self.token(user)}"}
        )

    def found(self, term: str, user: str) -> list[dict[str, Any]]:
        resp = self.search(term, user)
        assert resp.status_code == 200, resp.text
        results: list[dict[str, Any]] = resp.json()["results"]
        return results


@pytest.fixture(scope="module")
def page(airflow_with_teams: dict[str, str], a_with_rows: str) -> Page:
    return Page(airflow_with_teams)


def a_id(dsn: str, level: str, source: str, key: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT id::text FROM {} WHERE source_system = %s AND source_key = %s").format(
                sql.Identifier("imaging", level)
            ),
            (source, key),
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_a_user_reads_the_sources_of_their_team_s_dags_only(page: Page) -> None:
    def listed(user: str) -> list[str]:
        resp = page.get("/api/sources", user)
        assert resp.status_code == 200, resp.text
        return [s["name"] for s in resp.json()["sources"]]

    assert listed("b_reader") == ["b"]
    assert listed("c_reader") == ["c", "pacs"]
    assert listed("admin") == ["b", "c", "pacs"]
    assert page.get("/api/sources/b", "b_reader").json()["synced"] is True
    for name in ("c", "pacs"):
        refused = page.get(f"/api/sources/{name}", "b_reader")
        assert refused.status_code == 403, (name, refused.text)
        assert page.get(f"/api/sources/{name}", "c_reader").status_code == 200
    assert page.get("/api/sources/b", "c_reader").status_code == 403


def test_a_search_reveals_nothing_of_a_source_the_user_may_not_read(page: Page, a_with_rows: str) -> None:
    dsn = a_with_rows
    c_study = a_id(dsn, "study", "c", C_STUDY)
    # C's reader finds C's study by A's id and by C's key ...
    (by_id,) = page.found(c_study, "c_reader")
    assert (by_id["source"], by_id["source_key"], by_id["states"]) == ("c", C_STUDY, ["stored"])
    assert page.found(C_STUDY, "c_reader")[0]["stored"]["a_id"] == c_study
    # ... B's reader learns nothing: the answer for C's id is the one for an id A does not have.
    nowhere = str(uuid.uuid4())
    (hidden,) = page.found(c_study, "b_reader")
    (absent,) = page.found(nowhere, "b_reader")
    assert hidden == absent == {"sources": ["b"], "states": ["not found"]}
    assert page.found(C_STUDY, "b_reader") == [hidden]  # C's key is a UUID: looked up as an id too
    assert page.found("c-key-of-no-one", "b_reader") == [{"sources": ["b"], "states": ["never seen"]}]
    for term in (c_study, C_STUDY, C_SUBJECT):
        assert C_STUDY not in page.search(term, "b_reader").text
    # Nor does an id of the PACS (C's team), nor a PatientID.
    pacs_subject = a_id(dsn, "subject", "pacs", PACS_PHI[0])
    assert page.found(pacs_subject, "b_reader") == [{"sources": ["b"], "states": ["not found"]}]
    assert page.found(PACS_PHI[0], "b_reader")[0]["states"] == ["never seen"]
    # B's reader does find B's records.
    i1 = a_id(dsn, "instance", "b", "i1")
    assert page.found(i1, "b_reader")[0]["states"] == ["stored"]


def test_the_search_term_is_in_no_url_nor_in_airflow_s_access_log(page: Page) -> None:
    """A term may be a patient's MRN: it is POSTed, and the API server's access log records only the path."""
    from structlog.testing import capture_logs

    with capture_logs() as logged:
        (found,) = page.found(PACS_PHI[0], "admin")
    assert found["states"] == ["stored"]
    access = [e for e in logged if e.get("event") == "request finished"]
    assert [(e["method"], e["path"]) for e in access] == [("POST", "/api/search")]
    assert PACS_PHI[0] not in repr(logged)
    assert page.client.get("/api/search", params={"q": "x"}).status_code == 405


def test_no_patient_id_reaches_any_answer(page: Page, a_with_rows: str) -> None:
    """The PACS's subject keys are MRNs: whatever is asked, the answers show them masked."""
    dsn = a_with_rows
    subject = a_id(dsn, "subject", "pacs", PACS_PHI[0])
    study = a_id(dsn, "study", "pacs", "1.2.826.0.1.3680043.8.498.101")
    answers = [page.get(p, u) for p in ("/api/sources", "/api/sources/pacs") for u in ("admin", "c_reader")]
    terms = [*PACS_PHI[:3], subject, study, "1.2.826.0.1.3680043.8.498.102", "1.2.826.0.1.3680043.8.498.103"]
    answers += [page.search(term, user) for term in terms for user in ("admin", "c_reader")]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for answer in answers:
        for secret in PACS_PHI:
            assert secret not in answer.text, (secret, answer.text)
    # The match still works, and the same patient has the same token wherever it is shown.
    (by_key,) = page.found(PACS_PHI[0], "c_reader")
    assert by_key["stored"]["a_id"] == subject and by_key["source_key"].startswith("patient#")
    assert page.found(subject, "c_reader")[0]["source_key"] == by_key["source_key"]
    overview = page.get("/api/sources/pacs", "c_reader").json()
    (held,) = [g for g in overview["quarantine"] if g["level"] == "subject"]
    waiting = {w["source_key"]: w["parent_key"] for w in overview["pending"]["study"]["longest_waiting"]}
    assert waiting["1.2.826.0.1.3680043.8.498.102"] == held["sample_keys"][0]
