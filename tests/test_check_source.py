"""`python -m medsync.check_source`: a source checked without syncing, against the simulator of B."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from medsync import check_source
from simulator import BSimulator, SimConfig

KEY = "check-source-key"


@pytest.fixture
def b_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[BSimulator]:
    config = SimConfig(seed=3, patients=6, clock="manual", defects={"pat_000000000002": "missing_mrn"})
    with BSimulator(config, api_key=KEY) as sim:
        monkeypatch.setenv(
            "AIRFLOW_CONN_MEDSYNC_B_API", json.dumps({"conn_type": "http", "host": sim.base_url, "password": KEY})
        )
        yield sim


def test_config_and_mapping_are_checked_without_a_connection() -> None:
    out = io.StringIO()
    assert check_source.check("b", fetch=False, days=1, out=out)
    text = out.getvalue()
    assert "config b.yaml and mapping b.yaml are valid" in text
    assert "instance: deletions inline, parent by series_uid" in text


def test_one_page_of_each_level_is_parsed_and_held_back_records_say_why(b_api: BSimulator) -> None:
    out = io.StringIO()
    ok = check_source.check("b", fetch=True, days=36500, out=out)
    text = out.getvalue()
    assert not ok  # the defective patient is held back
    assert "held back x1: required field missing or empty: mrn" in text
    assert "sex " in text and "modality" in text
    assert f"subject {b_api.counts()['patients']}" in text
    # No record content: no MRN, name or birth date of any simulated patient reaches the output.
    for patient in b_api.live_records("patients"):
        for value in (patient.get("mrn"), (patient.get("name") or {}).get("family"), patient.get("birth_date")):
            if value:
                assert str(value) not in text


def test_a_bad_source_name_is_refused_with_exit_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_source.main(["no_such_source"]) == 1
    assert "no source config" in capsys.readouterr().err
