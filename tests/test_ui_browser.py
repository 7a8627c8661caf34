"""The medsync page through a real Airflow: its API answers, and what a person sees in a browser.

One native stack (``tests/airflow_stack.py``: api-server, scheduler, dag-processor, with
``plugins/`` loaded, so the page's plugin is mounted as in production) runs the real
``medsync_b`` against the B simulator (some records with an unknown vocabulary value, so
something is held back) and an S3 server with B's files: the scheduled run that unpausing
makes, then a full refresh. Then:

- the page's API refuses requests without a token (401), with a token Airflow did not sign
  (403) and from a user whom the auth manager does not let read ``medsync_b`` (403); a
  viewer and an admin see the figures, which are the ones the runs recorded in A's database;
- headless Chromium (Debian's, with its driver; ``scripts/ensure-chromium.sh`` installs them
  when missing) logs in on Airflow's login page, opens **medsync** from the UI's navigation,
  and checks the run table's figures, a quarantine reason and the chart; the screenshot is
  saved in ``build/artifacts/``;
- no MRN, name or birth date of B's patients appears in the page's HTML or its API's answers;
- with a PACS's rows added to A (its subjects' source keys are PatientIDs, i.e. MRNs), the
  page shows the PACS's quarantine, waiting studies and a search by PatientID with every
  such key masked: no PatientID in the HTML.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import requests
from airflow_stack import (
    AirflowStack,
    StackConfig,
    drop_stale_databases,
    free_port,
    migrated_metadata_db,
    simulator_process,
)
from conftest import ROOT, RUN_TAG, create_database, drop_database
from test_airflow_stack import SIM_ARGS, MedsyncEnv, b_records, medsync_scenario, upload_b_files

from simulator.client import SimAdminClient
from tests.test_ui_queries import PACS_PHI, PACS_WAITS_FOR_HELD, insert_pacs_rows

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "build" / "artifacts"
USERS = {"admin": "admin", "viewer": "viewer", "outsider": ""}
"""SimpleAuthManager users and their roles; a user without a role may read nothing."""
PAGE = "/medsync/"


@dataclass
class UiStack:
    stack: AirflowStack
    a_dsn: str
    passwords: dict[str, str]
    b_patients: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def token(self, user: str) -> str:
        resp = requests.post(
            f"{self.base_url}/auth/token",
            json={"username": user, "password": self.passwords[user]},
            timeout=15,
        )
        resp.raise_for_status()
        return str(resp.json()["access_token"])

    def get(self, path: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, user, **kwargs)

    def search(self, term: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        """The page's search: POSTed, so that the term is in no URL (nor in the API server's access log)."""
        return self.request("POST", "/medsync/api/search", user, json={"q": term}, **kwargs)

    def request(self, method: str, path: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.request(
            method, f"{self.base_url}{path}", headers=headers, timeout=60, allow_redirects=False, **kwargs
        )

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.a_dsn) as conn:
            return conn.execute(text, args).fetchall()

    def phi(self) -> list[str]:
        """MRNs, family names and birth dates of B's patients: none may reach the page."""
        found = []
        for p in self.b_patients:
            name = p.get("name") or {}
            found += [v for v in (p.get("mrn"), name.get("family"), name.get("given"), p.get("birth_date")) if v]
        return [v for v in found if len(v) >= 5]


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[UiStack]:
    from moto.server import ThreadedMotoServer

    drop_stale_databases()
    metadata = migrated_metadata_db(f"airflow_tpl_{RUN_TAG}_ui")
    a_name = f"medsync_ui_{RUN_TAG}_{uuid.uuid4().hex[:6]}"
    a_dsn = create_database(a_name, template=a_template_db)
    home = tmp_path_factory.mktemp("ui-stack")
    passwords = {user: f"{user}-{uuid.uuid4().hex[:8]}" for user in USERS}
    pw_file = home / "users.json"
    pw_file.write_text(json.dumps(passwords))
    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    api_key = uuid.uuid4().hex
    bucket = f"b-imaging-{uuid.uuid4().hex[:8]}"
    sim_args = (*SIM_ARGS, "--unknown-enum-fraction", "0.05")
    try:
        with simulator_process(api_key, patients=12, extra_args=sim_args) as base_url:
            upload_b_files(base_url, api_key, f"http://127.0.0.1:{s3_port}", bucket)
            patients = b_records(base_url, api_key, "patients", include_deleted="true")
            env = MedsyncEnv(base_url, api_key, s3_port, bucket, medsync_scenario(patients))
            config = StackConfig(
                dags_folder=ROOT / "dags",
                plugins_folder=ROOT / "plugins",
                connections=env.connections(a_dsn),
                variables={"medsync_b_bucket": bucket},
                metadata_template=metadata,
                home=home / "airflow",
                admin_password=passwords["admin"],
                extra_env={
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
                },
            )
            with AirflowStack(config) as stack:
                api = stack.api
                api.timeout = 60  # the machine's cores are shared: a busy API server may take a while
                api.wait_dag_parsed("medsync_b", alive=stack.check_alive)
                api.unpause("medsync_b")  # the scheduler makes the latest interval's run (catchup is off)
                runs = api.wait_runs("medsync_b", count=1, where=lambda r: r["run_type"] == "scheduled",
                                     timeout=600, alive=stack.check_alive)  # fmt: skip
                full = api.trigger("medsync_b", conf={"full_refresh": True})
                runs += api.wait_runs("medsync_b", [full["dag_run_id"]], timeout=600, alive=stack.check_alive)
                # B changes a tenth of its records (updates, deletes, new ones with their files); a manual
                # run syncs them from the watermark on.
                SimAdminClient(base_url, api_key, timeout=30).mutate_fraction(0.1, seed=3)
                upload_b_files(base_url, api_key, f"http://127.0.0.1:{s3_port}", bucket)
                manual = api.trigger("medsync_b", conf={"full_refresh": False})
                runs += api.wait_runs("medsync_b", [manual["dag_run_id"]], timeout=600, alive=stack.check_alive)
                yield UiStack(stack, a_dsn, passwords, patients, runs)
    finally:
        moto.stop()
        drop_database(a_name)
        drop_database(metadata)
        shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The API.
# ------------------------------------------------------------------------------------------------
def test_the_plugin_is_loaded_with_its_app_and_nav_entry(ui: UiStack) -> None:
    plugins = ui.stack.api.get("/plugins")["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "medsync_ui"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/medsync"]
    assert [(v["name"], v["url_route"], v["href"]) for v in plugin["external_views"]] == [
        ("medsync", "medsync", "/medsync/")
    ]
    assert plugin["flask_blueprints"] == [] and plugin["appbuilder_views"] == []


API_ROUTES = [("GET", "/medsync/api/sources"), ("GET", "/medsync/api/sources/b"), ("POST", "/medsync/api/search")]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_requests_without_a_valid_token_or_permission_are_refused(ui: UiStack, method: str, path: str) -> None:
    body = {"json": {"q": "x"}} if method == "POST" else {}
    assert ui.request(method, path, **body).status_code == 401
    assert ui.request(method, path, headers={"Authorization": "Bearer not-a-token"}, **body).status_code == 403
    assert ui.request(method, path, headers={"Cookie": "_token=not-a-token"}, **body).status_code == 403
    refused = ui.request(method, path, "outsider", **body)
    assert refused.status_code == 403, refused.text
    assert ui.request(method, path, "viewer", **body).status_code == 200


def test_the_page_sends_a_visitor_without_a_token_to_the_login(ui: UiStack) -> None:
    resp = ui.get(PAGE)
    assert resp.status_code == 307 and "/auth/login" in resp.headers["location"]
    page = ui.get(PAGE, headers={"Cookie": f"_token={ui.token('viewer')}"})
    assert page.status_code == 200 and "medsync.js" in page.text


def test_the_figures_are_those_of_the_runs(ui: UiStack) -> None:
    data = ui.get("/medsync/api/sources/b", "admin").json()
    assert data["synced"] and data["dag_id"] == "medsync_b"
    shown = {r["dag_run_id"]: r for r in data["runs"]}
    assert set(shown) == {r["dag_run_id"] for r in ui.runs}
    assert [r["kind"] for r in data["runs"]] == ["manual", "full_refresh", "scheduled"]
    changed = data["runs"][0]["levels"]
    assert sum(f["updated"] for f in changed.values()) > 0
    assert all(r["status"] == "succeeded" and r["duration_seconds"] > 0 for r in data["runs"])
    for dag_run_id, report in ui.query("SELECT dag_run_id, report FROM medsync.sync_run"):
        levels = shown[dag_run_id]["levels"]
        for level, figures in report["levels"].items():
            for name in ("pulled", "inserted", "updated", "unchanged", "deleted", "quarantined", "pending"):
                assert levels[level][name] == figures[name], (dag_run_id, level, name)
            assert levels[level]["difference"] == figures["difference"]
    # A's live rows as the page shows them are A's rows.
    for level, kept in data["live_counts"].items():
        ((live,),) = ui.query(f"SELECT count(*) FROM imaging.{level} WHERE source_system = 'b' AND deleted_at IS NULL")
        assert kept["live"] == live, level
    # Every open quarantine entry is in one group, and there is something held back.
    ((held,),) = ui.query("SELECT count(*) FROM medsync.quarantine WHERE resolved_at IS NULL")
    assert held > 0 and sum(g["count"] for g in data["quarantine"]) == held
    assert data["file_check"]["checked"] > 0 and data["file_check"]["ok"] == data["file_check"]["checked"]
    # The chart's bars are the runs' own figures.
    for bar in data["changes"]:
        run = shown[bar["dag_run_id"]]
        assert bar["inserted"] == sum(f["inserted"] for f in run["levels"].values())
    assert set(data["watermarks"]) == {"subject", "study", "sequence", "instance"}


def test_search_finds_a_quarantined_record_and_a_stored_one(ui: UiStack) -> None:
    ((key, reason),) = ui.query(
        "SELECT source_key, reason FROM medsync.quarantine WHERE resolved_at IS NULL ORDER BY source_key LIMIT 1"
    )
    (found,) = ui.search(key, "viewer").json()["results"]
    assert "quarantined" in found["states"] and found["quarantine"]["reason"] == reason
    ((a_id, study_key),) = ui.query("SELECT id::text, source_key FROM imaging.study ORDER BY source_key LIMIT 1")
    (stored,) = ui.search(a_id, "viewer").json()["results"]
    assert (stored["level"], stored["source_key"], stored["stored"]["a_id"]) == ("study", study_key, a_id)


# ------------------------------------------------------------------------------------------------
# The browser.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless Debian Chromium driven by selenium; installed with apt by scripts/ensure-chromium.sh."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        proc = subprocess.run([str(ROOT / "scripts" / "ensure-chromium.sh")], capture_output=True, text=True,
                              timeout=900, check=False)  # fmt: skip
        if proc.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"chromium could not be installed:\n{proc.stderr[-2000:]}")
            pytest.skip(f"chromium is missing and apt cannot install it here: {proc.stderr.strip()[-300:]}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1900", "--lang=en-US"):  # fmt: skip
        options.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_person_logs_in_and_sees_the_runs_the_quarantine_and_the_chart(ui: UiStack, chromium: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = chromium, WebDriverWait(chromium, 60)
    driver.get(f"{ui.base_url}/")
    # Airflow's login page (SimpleAuthManager): the two inputs, then the button.
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[name=username], input#username")))
    inputs = driver.find_elements(By.CSS_SELECTOR, "form input")
    inputs[0].send_keys("viewer")
    inputs[1].send_keys(ui.passwords["viewer"])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit], form button").click()
    # The UI's navigation has the plugin's entry; it shows the page in an iframe.
    entry = wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "a[href$='plugin/medsync'], a[href*='/plugin/medsync']"))
    )
    entry.click()
    frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe[title=medsync]")))
    driver.switch_to.frame(frame)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-loaded=b]")))

    data = ui.get("/medsync/api/sources/b", "admin").json()
    full = next(r for r in data["runs"] if r["kind"] == "full_refresh")
    row = driver.find_element(By.CSS_SELECTOR, f"tr[data-run='{full['dag_run_id']}'][data-level='instance']")
    shown = {name: row.find_element(By.CSS_SELECTOR, f"td.fig-{name}").text for name in ("pulled", "inserted")}
    assert shown == {name: f"{full['levels']['instance'][name]:,}" for name in ("pulled", "inserted")}
    link = driver.find_element(By.CSS_SELECTOR, f"a.run-link[href$='/runs/{quote(full['dag_run_id'], safe='')}']")
    assert link.get_attribute("target") == "_top" and "/dags/medsync_b/runs/" in link.get_attribute("href")
    reasons = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#quarantine td.reason")]
    assert data["quarantine"][0]["reason"] in reasons and "unknown value" in " ".join(reasons)
    bars = driver.find_elements(By.CSS_SELECTOR, "#changes-chart g.bar rect")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#changes-chart g.bar")) == len(data["changes"]) == 3
    assert bars and all(float(b.get_attribute("height")) > 0 for b in bars)
    assert "readable" in driver.find_element(By.ID, "files-summary").text

    # The search box: where a record waiting for its parent stands.
    waiting = next(p for p in data["pending"].values() if p["longest_waiting"])["longest_waiting"][0]
    driver.find_element(By.ID, "search-term").send_keys(waiting["source_key"], Keys.ENTER)
    found = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#search-body .found")))
    assert "pending" in found.find_element(By.CSS_SELECTOR, ".search-state").text
    assert waiting["parent_key"] in found.text

    # What a person sees holds no patient data; nor does anything the page's API answers.
    html = driver.page_source
    answers = [ui.get(p, "admin").text for p in ("/medsync/api/sources", "/medsync/api/sources/b")]
    answers += [ui.search(g["sample_keys"][0], "admin").text for g in data["quarantine"]]
    for secret in ui.phi():
        assert secret not in html and all(secret not in a for a in answers)

    driver.switch_to.default_content()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-medsync.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")


def test_a_pacs_s_patient_ids_are_masked_on_the_page(ui: UiStack, chromium: Any) -> None:
    """The PACS keys subjects by PatientID (the MRN): quarantine, waiting studies and a search show tokens."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with psycopg.connect(ui.a_dsn) as conn:
        insert_pacs_rows(conn)
    driver, wait = chromium, WebDriverWait(chromium, 60)
    driver.switch_to.default_content()
    driver.get(f"{ui.base_url}{PAGE}?source=pacs")  # the page alone; a browser without the UI's cookie logs in
    if driver.find_elements(By.CSS_SELECTOR, "input[name=username], input#username"):
        inputs = driver.find_elements(By.CSS_SELECTOR, "form input")
        inputs[0].send_keys("viewer")
        inputs[1].send_keys(ui.passwords["viewer"])
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit], form button").click()
        driver.get(f"{ui.base_url}{PAGE}?source=pacs")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-loaded=pacs]")))
    held = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#quarantine td.keys")]
    waiting = " ".join(td.text for td in driver.find_elements(By.CSS_SELECTOR, "#pending td.keys"))
    assert len(held) == 1 and held[0].startswith("patient#") and PACS_WAITS_FOR_HELD in waiting
    assert f"{PACS_WAITS_FOR_HELD} → {held[0]}" in waiting  # the same patient, the same token
    driver.find_element(By.ID, "search-term").send_keys(PACS_PHI[0], Keys.ENTER)
    found = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#search-body .found")))
    assert "stored" in found.find_element(By.CSS_SELECTOR, ".search-state").text and "patient#" in found.text
    html = driver.page_source
    for secret in PACS_PHI:
        assert secret not in html
