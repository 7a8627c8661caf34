"""`python -m medsync.check_source`: a source checked without syncing, against the simulators of B and C."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsync import check_source
from medsync.config import include_dir
from simulator import BSimulator, SimConfig
from simulator_c import CSimulator, FaultConfig
from simulator_c import SimConfig as CSimConfig

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


C_TOKEN = "check-source-c-token"


@pytest.fixture
def c_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[CSimulator]:
    config = CSimConfig(
        seed=4, participants=6, clock="manual", invalid_fraction=0.0, deleted_fraction=0.1,
        defects={"participants:2": "empty_mrn", "files:3": "bucket_not_allowed", "acquisitions:1": "unknown_side"},
    )  # fmt: skip
    with CSimulator(config, token=C_TOKEN, faults=FaultConfig(rate_limit=None)) as sim:
        monkeypatch.setenv(
            "AIRFLOW_CONN_MEDSYNC_C_API", json.dumps({"conn_type": "http", "host": sim.base_url, "password": C_TOKEN})
        )
        yield sim


def test_c_against_its_simulator_held_back_records_say_why_and_no_phi_is_printed(c_api: CSimulator) -> None:
    out = io.StringIO()
    # The default look-back (a century) reaches before 1970: C refuses negative epoch bounds, so the
    # check must start no earlier than the epoch, as a full refresh does.
    ok = check_source.check("c", fetch=True, days=36500, out=out)
    text = out.getvalue()
    assert not ok
    assert "config c.yaml and mapping c.yaml are valid" in text
    assert "instance: deletions feed, parent by source_key" in text
    assert "held back x1: required field missing or empty: identifiers.mrn" in text
    assert "held back x1: object.bucket: is not one of the buckets allowed for this source" in text
    assert "held back x1: side: unknown value" in text
    counts = c_api.counts()
    assert f"subject {counts['participants']}, study {counts['visits']}" in text
    assert f"instance {counts['files']}" in text
    for participant in c_api.live_records("participants"):
        family, _, given = (participant.get("display_name") or "").partition(",")
        for value in (participant["identifiers"].get("mrn"), participant.get("dob"), family.strip(), given.strip()):
            if value and len(value) >= 4:
                assert str(value) not in text
    for visit in c_api.live_records("visits"):
        assert visit["study_instance_uid"] not in text
    # The deletion feed's first page is sampled for every level; its items are shared out among them.
    feed = re.findall(r"deletions feed, first page: (\d+) items, (\d+) of this level: (\d+) tombstones, 0 held", text)
    assert len(feed) == 4
    page_items = {int(items) for items, _, _ in feed}
    assert len(page_items) == 1 and sum(int(mine) for _, mine, _ in feed) == page_items.pop() > 0
    assert all(mine == tombstones for _, mine, tombstones in feed)


def c_config_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[dict[str, Any]], None]) -> None:
    """C's config and mapping in an include directory of their own, the config changed by ``change``."""
    for folder in ("sources", "mappings"):
        (tmp_path / folder).mkdir()
        shutil.copy(include_dir() / folder / "c.yaml", tmp_path / folder / "c.yaml")
    config = yaml.safe_load((tmp_path / "sources" / "c.yaml").read_text())
    change(config)
    (tmp_path / "sources" / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MEDSYNC_INCLUDE_DIR", str(tmp_path))


def test_a_wrong_deletion_key_path_shows_as_held_back_feed_items(
    c_api: CSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_config_with(tmp_path, monkeypatch, lambda c: c["api"]["deletions"]["key"].update(path="id"))
    out = io.StringIO()
    assert not check_source.check("c", fetch=True, days=36500, out=out)
    text = out.getvalue()
    held = re.findall(r"deletions feed, first page: \d+ items, (\d+) of this level: 0 tombstones, (\d+) held", text)
    assert len(held) == 4 and all(mine == n for mine, n in held)
    assert "held back x" in text and ": deletion item: id: Field required" in text
    for item in c_api.deletions():
        assert item["uuid"] not in text  # keys are not printed either


def test_a_wrong_deletion_resource_path_is_said(
    c_api: CSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_config_with(tmp_path, monkeypatch, lambda c: c["api"]["deletions"].update(resource_path="kind"))
    out = io.StringIO()
    assert not check_source.check("c", fetch=True, days=36500, out=out)
    text = out.getvalue()
    assert text.count(" items, 0 of this level: 0 tombstones, 0 held back") == 4
    assert "deletions feed: none of the first page's" in text and "check the feed's resource names" in text
