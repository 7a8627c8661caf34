"""The service-B simulator honours B's contract, and its faults really happen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from simulator import BSimulator, SimConfig
from simulator.client import SimAdminClient, spawn
from simulator.model import Catalogue
from simulator.timefmt import parse, render, render_utc

KEY = "sim-test-key"
ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ("patients", "studies", "series", "images")


def manual(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {"clock": "manual", "seed": 7}
    base.update(kw)
    return SimConfig(**base)


@pytest.fixture
def sim() -> Iterator[BSimulator]:
    cfg = manual(patients=12, studies_per_patient=2, series_per_study=2, images_per_series=4)
    with BSimulator(cfg, api_key=KEY) as s:
        yield s


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["X-API-Key"] = KEY
        yield s


def page_all(http: requests.Session, url: str, **params: Any) -> list[dict[str, Any]]:
    """Every record of a listing, following next_cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        p = dict(params)
        if cursor:
            p["cursor"] = cursor
        r = http.get(url, params=p, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"data", "next_cursor"}
        out.extend(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def key(rec: dict[str, Any]) -> tuple[int, str]:
    return parse(rec["updated_at"]), rec["id"]


# ---------------------------------------------------------------------- timestamps


def test_render_parse_round_trip_over_offsets_and_precisions() -> None:
    base = parse("2026-02-28T23:59:59.999999+00:00")
    spellings = set()
    for i in range(2000):
        t = base + i * 123_457 - (i % 3) * 999_999 + (0 if i % 5 else -(base % 1_000_000))
        for style in range(0, 4096, 97):
            text = render(t, style)
            spellings.add(text[19:])
            assert parse(text) == t, text
    assert any(s.endswith("Z") for s in spellings) and any(s.endswith("+09:00") for s in spellings)
    assert any(s[:1] in "Z+-" for s in spellings), "some instants without fractional seconds"
    assert parse("2026-01-01T09:00:00+09:00") == parse("2026-01-01T00:00:00Z") == parse("2025-12-31T19:00:00-05:00")
    for bad in ("2026-01-01", "2026-01-01T00:00:00", "yesterday", "2026-02-30T00:00:00Z", "2026-01-01T00:00:00 09:00"):
        with pytest.raises(ValueError):
            parse(bad)


# ---------------------------------------------------------------------- paging and windows


def test_paging_covers_a_window_exactly_once_in_instant_order(sim: BSimulator, http: requests.Session) -> None:
    everything = list(sim.records("images", include_deleted=True))
    instants = sorted(parse(r["updated_at"]) for r in everything)
    since, before = instants[len(instants) // 5], instants[4 * len(instants) // 5]
    # The bounds are spelled in other offsets than the data: they are compared as instants.
    got = page_all(
        http,
        f"{sim.base_url}/images",
        updated_since=render(since, 1),
        updated_before=render(before, 2),
        limit=7,
    )
    want = [r for r in everything if since <= parse(r["updated_at"]) < before]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert len({r["id"] for r in got}) == len(got)
    assert [key(r) for r in got] == sorted(key(r) for r in got)
    assert got == want
    # The data really is awkward: mixed offsets, shared instants, with and without fractions.
    offsets = {r["updated_at"][19:].lstrip(".0123456789") for r in everything}
    assert len(offsets) >= 4
    assert any("." not in r["updated_at"] for r in everything)
    assert any("." in r["updated_at"] for r in everything)
    assert len(instants) > len(set(instants)), "some records share an instant"
    # The string order of updated_at is not the instant order, so a client must parse.
    assert [r["updated_at"] for r in everything] != sorted(r["updated_at"] for r in everything)


@pytest.mark.parametrize("history_seconds", [30 * 86400.0, 20.0])
def test_merged_streams_match_brute_force_for_random_windows(history_seconds: float) -> None:
    import random

    cfg = manual(
        patients=15, images_per_series=6, orphan_fraction=0.25, shared_timestamp_fraction=0.5,
        history_seconds=history_seconds,
    )  # fmt: skip
    cat = Catalogue(cfg)
    for step in range(3):
        cat.advance(0 if step == 1 else 30)  # step 1 reuses the instant of step 0: shared timestamps
        cat.mutate_fraction(0.15, seed=step)
    rng = random.Random(1)
    for resource in RESOURCES:
        everything = list(cat.records(resource, include_deleted=True, chunk=7))
        keys = [key(r) for r in everything]
        assert keys == sorted(keys) and len({k[1] for k in keys}) == len(keys)
        assert all(k[0] <= cat.now_us() for k in keys)
        live = [r for r in everything if not r["deleted"]]
        assert cat.counts()[resource] == len(live)
        instants = [k[0] for k in keys]
        for _ in range(15):
            a, b = sorted(rng.choice(instants) + rng.choice((-1, 0, 1)) for _ in range(2))
            deleted = rng.random() < 0.5
            want = [r for r in everything if a <= parse(r["updated_at"]) < b and (deleted or not r["deleted"])]
            got: list[dict[str, Any]] = []
            after = None
            while True:
                recs, after = cat.page(
                    resource, since=a, before=b, include_deleted=deleted, limit=rng.randint(1, 5), after=after
                )
                got.extend(recs)
                if after is None:
                    break
            assert got == want


def test_window_is_half_open(sim: BSimulator, http: requests.Session) -> None:
    rec = list(sim.live_records("series"))[10]
    t = parse(rec["updated_at"])
    url = f"{sim.base_url}/series"
    inside = page_all(http, url, updated_since=render(t, 6), updated_before=render(t + 1, 7))
    assert rec["id"] in {r["id"] for r in inside}
    assert all(parse(r["updated_at"]) == t for r in inside)
    assert rec["id"] not in {r["id"] for r in page_all(http, url, updated_before=render(t, 2))}
    assert rec["id"] not in {r["id"] for r in page_all(http, url, updated_since=render(t + 1, 0))}


def test_limit_default_bounds_and_validation(sim: BSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/images"
    assert len(http.get(url).json()["data"]) == 100
    assert len(http.get(url, params={"limit": 1}).json()["data"]) == 1
    assert len(http.get(url, params={"limit": 1000}).json()["data"]) == sim.counts()["images"]
    for bad in ("0", "1001", "-1", "abc", "", "1.5", "\uff11"):
        r = http.get(url, params={"limit": bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize(
    "param,value",
    [
        ("updated_since", "2026-01-01"),
        ("updated_since", "2026-01-01T00:00:00"),
        ("updated_before", "not-a-time"),
        ("updated_before", "2026-13-01T00:00:00Z"),
        ("include_deleted", "yes"),
    ],
)
def test_invalid_parameters_are_400(sim: BSimulator, http: requests.Session, param: str, value: str) -> None:
    r = http.get(f"{sim.base_url}/studies", params={param: value})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_parameter"


def test_unencoded_plus_in_offset_is_rejected(sim: BSimulator, http: requests.Session) -> None:
    # A client that forgets to percent-encode '+' sends a space: a real server says 400.
    r = http.get(f"{sim.base_url}/studies?updated_since=2026-01-01T00:00:00+09:00")
    assert r.status_code == 400


# ---------------------------------------------------------------------- deletes and the overlay


def test_tombstones_only_with_include_deleted(sim: BSimulator, http: requests.Session) -> None:
    victim = list(sim.live_records("images"))[3]["id"]
    sim.advance(60)
    assert sim.delete("images", victim) == [victim]
    url = f"{sim.base_url}/images"
    assert victim not in {r["id"] for r in page_all(http, url, limit=50)}
    with_deleted = page_all(http, url, limit=50, include_deleted="true")
    tomb = [r for r in with_deleted if r["id"] == victim]
    assert len(tomb) == 1
    assert set(tomb[0]) == {"id", "updated_at", "deleted"} and tomb[0]["deleted"] is True
    assert parse(tomb[0]["updated_at"]) == sim.now_us()
    assert http.get(f"{url}/{victim}").json() == tomb[0]


def test_changed_record_leaves_its_old_position(sim: BSimulator, http: requests.Session) -> None:
    old = list(sim.live_records("studies"))[5]
    t_old = parse(old["updated_at"])
    sim.advance(3600)
    new = sim.update("studies", old["id"], description="amended")
    assert parse(new["updated_at"]) == sim.now_us() > t_old
    url = f"{sim.base_url}/studies"
    old_window = page_all(http, url, updated_since=render(t_old, 0), updated_before=render(t_old + 1, 0))
    assert old["id"] not in {r["id"] for r in old_window}
    listed = [r for r in page_all(http, url, limit=3) if r["id"] == old["id"]]
    assert listed == [new] and new["description"] == "amended"
    assert {k: v for k, v in new.items() if k not in ("updated_at", "description")} == {
        k: v for k, v in old.items() if k not in ("updated_at", "description")
    }
    # Two changes at one manual instant still move the record forward.
    again = sim.update("studies", old["id"], description="twice")
    assert parse(again["updated_at"]) == parse(new["updated_at"]) + 1


def test_cascade_delete_and_undelete(sim: BSimulator) -> None:
    study = "stu_000000000003"
    series = [s["id"] for s in sim.live_records("series") if s["study_id"] == study]
    uids = {s["series_uid"] for s in sim.live_records("series") if s["study_id"] == study}
    images = [i["id"] for i in sim.live_records("images") if i["series_uid"] in uids]
    assert len(series) == 2 and len(images) == 8
    before = sim.counts()
    sim.advance(10)
    sim.delete("series", series[0])  # deleted on its own first: must stay deleted later
    sim.advance(10)
    ids = sim.delete("studies", study)
    assert ids[0] == study and set(ids) == {study, series[1], *images[4:]}
    t = sim.now_us()
    for resource, rid in [("studies", study), ("series", series[1]), ("images", images[5])]:
        tomb = sim.get(resource, rid)
        assert tomb is not None and tomb["deleted"] is True and parse(tomb["updated_at"]) == t
    after = sim.counts()
    assert after["studies"] == before["studies"] - 1
    assert after["series"] == before["series"] - 2
    assert after["images"] == before["images"] - 8
    sim.advance(10)
    restored = sim.undelete("studies", study, cascade=True)
    assert set(restored) == {study, series[1], *images[4:]}
    assert sim.get("series", series[0])["deleted"] is True  # type: ignore[index]
    assert sim.get("images", images[0])["deleted"] is True  # type: ignore[index]
    back = sim.get("studies", study)
    assert back is not None and back["deleted"] is False and back["study_uid"]
    assert sim.counts()["series"] == before["series"] - 1
    assert sim.undelete("studies", study) == []  # already live
    assert sim.delete("series", series[0]) == []  # already deleted


def test_deleting_a_patient_cascades_through_new_records_too(sim: BSimulator) -> None:
    tree = sim.add_patient_tree(studies=2, series=1, images=3)
    extra = sim.add("images", tree["series"][0])
    assert len(tree["images"]) == 6 and extra["number"] == 4
    ids = sim.delete("patients", tree["patient"])
    assert set(ids) == {tree["patient"], *tree["studies"], *tree["series"], *tree["images"], extra["id"]}


# ---------------------------------------------------------------------- links, counts, determinism


def test_links_and_shapes(sim: BSimulator) -> None:
    patients = {p["id"]: p for p in sim.live_records("patients")}
    studies = {s["id"]: s for s in sim.live_records("studies")}
    series = list(sim.live_records("series"))
    uids = {s["series_uid"] for s in series}
    assert all(s["patient_id"] in patients for s in studies.values())
    assert all(s["study_id"] in studies for s in series)
    images = list(sim.live_records("images"))
    assert all(i["series_uid"] in uids for i in images)  # linked by UID, not by id
    for i in images:
        assert i["file_path"].startswith("/") and i["file_path"].endswith(f"/{i['id']}.dcm")
        assert i["content_type"] == "application/dicom"
        assert len(sim.file_bytes(i["id"])) == i["file_size"]
    files = dict(sim.iter_files())
    assert len(files) == len(images) and not any(k.startswith("/") for k in files)
    assert all(len(r["id"]) <= 64 for r in (*patients.values(), *images))


def test_children_not_before_parents_unless_orphans() -> None:
    def violations(cat: Catalogue) -> int:
        t = {r["id"]: parse(r["updated_at"]) for res in RESOURCES for r in cat.live_records(res)}
        uid_to_series = {s["series_uid"]: s["id"] for s in cat.live_records("series")}
        n = sum(t[s["id"]] < t[s["patient_id"]] for s in cat.live_records("studies"))
        n += sum(t[s["id"]] < t[s["study_id"]] for s in cat.live_records("series"))
        n += sum(t[i["id"]] < t[uid_to_series[i["series_uid"]]] for i in cat.live_records("images"))
        return n

    shape = {"patients": 20, "studies_per_patient": 3, "series_per_study": 2, "images_per_series": 5}
    assert violations(Catalogue(SimConfig.plain(**shape, shared_timestamp_fraction=0.5))) == 0
    orphans = Catalogue(SimConfig.plain(**shape, orphan_fraction=0.2, orphan_delay_seconds=86400))
    assert violations(orphans) > 10


def test_counts_follow_mutations(sim: BSimulator, http: requests.Session) -> None:
    sim.advance(1)
    summary = sim.mutate_fraction(0.2, seed=3)
    assert sum(summary["updated"].values()) > 0 and sum(summary["deleted"].values()) > 0
    body = http.get(f"{sim.base_url}/counts").json()
    assert body["as_of"] == render_utc(sim.now_us())
    for resource in RESOURCES:
        live = page_all(http, f"{sim.base_url}/{resource}", limit=1000)
        assert body[resource] == len(live) == len(list(sim.live_records(resource)))
        assert [key(r) for r in live] == sorted(key(r) for r in live)


def test_same_seed_same_data_other_seed_other_data() -> None:
    cfg = {"patients": 6, "images_per_series": 5, "awkward_text_fraction": 0.5, "invalid_fraction": 0.1}
    a, b = Catalogue(manual(**cfg)), Catalogue(manual(**cfg))
    for cat in (a, b):
        cat.advance(5)
        cat.mutate_fraction(0.3, seed=11)
    c = Catalogue(manual(**{**cfg, "seed": 8}))
    for resource in RESOURCES:
        ra = list(a.records(resource, include_deleted=True))
        assert ra == list(b.records(resource, include_deleted=True))
        assert ra != list(c.records(resource, include_deleted=True))


def test_awkward_text_survives_http_exactly(http: requests.Session) -> None:
    cfg = manual(patients=60, awkward_text_fraction=0.5, nul_fraction=0.1, long_text_fraction=0.05, null_fraction=0.3)
    with BSimulator(cfg, api_key=KEY) as s:
        for resource in ("patients", "studies", "series"):
            served = page_all(http, f"{s.base_url}/{resource}", limit=1000)
            assert served == list(s.live_records(resource))
        texts = [json.dumps(r, ensure_ascii=False) for res in ("patients", "studies", "series") for r in served]
        studies = list(s.live_records("studies"))
        patients = list(s.live_records("patients"))
    blob = "".join(texts) + json.dumps(studies, ensure_ascii=False) + json.dumps(patients, ensure_ascii=False)
    for needle in ("\\t", "\\n", "\\\\", '\\"', "김", "🩻", "^", "=", "\\u0000"):
        assert needle in blob, needle
    assert any(len(x.get("description") or "") > 10_000 for x in studies)
    names = [p["name"] for p in patients]
    assert None in names and any(n is not None and "family" not in n for n in names)
    assert any(p["gender"] is None for p in patients)


def test_unknown_enums_and_invalid_records_are_injected_and_reported() -> None:
    cfg = manual(patients=40, images_per_series=5, invalid_fraction=0.2, unknown_enum_fraction=0.2)
    cat = Catalogue(cfg)
    kinds = {res: cat.defects(res) for res in RESOURCES}
    assert {"unknown_gender"} <= set(kinds["patients"].values())
    assert {"unknown_modality", "unknown_body_part"} & set(kinds["series"].values())
    images = {i["id"]: i for i in cat.live_records("images")}
    paths = [images[i].get("file_path") for i, k in kinds["images"].items() if k.endswith("file_path")]
    assert any(isinstance(p, str) and not p.startswith("/") for p in paths)
    assert any(isinstance(p, str) and ("//" in p or "/../" in p or "/./" in p) for p in paths)
    series = {s["id"]: s for s in cat.live_records("series")}
    assert any(series[i]["modality"] == "SPECTRAL_CT" or series[i]["body_part"] == "ELBOW_LEFT" for i in series)
    # Explicit defects, and defects made and repaired later.
    cat2 = Catalogue(manual(defects={"pat_000000000001": "missing_mrn", "img_000000000002": "wrong_type"}))
    assert "mrn" not in cat2.get("patients", "pat_000000000001") or not cat2.get("patients", "pat_000000000001")["mrn"]  # type: ignore[index]
    assert cat2.defects("images") == {"img_000000000002": "wrong_type"}
    bad = cat2.make_invalid("studies", "stu_000000000000", "unknown_status")
    assert bad["status"] in ("ON_HOLD", "SCHEDULED")
    fixed = cat2.repair("studies", "stu_000000000000")
    assert fixed["status"] in ("ORDERED", "IN_PROGRESS", "COMPLETED", "CANCELLED")
    assert cat2.defects("studies") == {}


# ---------------------------------------------------------------------- auth, cursors


def test_auth_required_everywhere(sim: BSimulator) -> None:
    for url in (f"{sim.base_url}/patients", f"{sim.base_url}/counts", f"{sim.admin_url}/stats"):
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = requests.get(url, headers=headers, timeout=5)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
    stats = sim.stats()
    assert stats["responses"]["401"] == 6 and stats["requests"] == 4 and stats["admin_requests"] == 2


def test_cursor_with_other_filters_or_tampered_is_400(sim: BSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/images"
    cursor = http.get(url, params={"limit": 5, "updated_since": "2026-01-01T00:00:00Z"}).json()["next_cursor"]
    assert cursor
    ok = http.get(url, params={"limit": 9, "updated_since": "2026-01-01T09:00:00+09:00", "cursor": cursor})
    assert ok.status_code == 200  # same instant in another offset, another limit: same filters
    for params in (
        {"cursor": cursor},
        {"cursor": cursor, "updated_since": "2026-01-02T00:00:00Z"},
        {"cursor": cursor, "updated_since": "2026-01-01T00:00:00Z", "include_deleted": "true"},
        {"cursor": cursor[:-2] + "xx", "updated_since": "2026-01-01T00:00:00Z"},
        {"cursor": "garbage", "updated_since": "2026-01-01T00:00:00Z"},
    ):
        r = http.get(url, params=params)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor", params
    other = http.get(f"{sim.base_url}/series", params={"cursor": cursor, "updated_since": "2026-01-01T00:00:00Z"})
    assert other.status_code == 400


def test_cursor_expires_after_ttl(sim: BSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/images"
    cursor = http.get(url, params={"limit": 5}).json()["next_cursor"]
    sim.advance(3599)
    assert http.get(url, params={"limit": 5, "cursor": cursor}).status_code == 200
    sim.advance(2)
    r = http.get(url, params={"limit": 5, "cursor": cursor})
    assert r.status_code == 400 and r.json()["error"]["code"] == "cursor_expired"
    assert sim.stats()["cursor_expired_ttl"] == 1


def test_get_by_id(sim: BSimulator, http: requests.Session) -> None:
    rec = sim.get("series", "ser_000000000004")
    assert http.get(f"{sim.base_url}/series/ser_000000000004").json() == rec
    for missing in ("ser_999999999999", "nope", "img_000000000001"):
        r = http.get(f"{sim.base_url}/series/{missing}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------- faults


def test_throttle_every_kth_request_with_retry_after(sim: BSimulator, http: requests.Session) -> None:
    sim.set_faults(throttle_every=3, retry_after=2)
    codes = [http.get(f"{sim.base_url}/counts") for _ in range(6)]
    assert [r.status_code for r in codes] == [200, 200, 429, 200, 200, 429]
    assert codes[2].headers["Retry-After"] == "2" and codes[2].json()["error"]["code"] == "rate_limited"
    assert sim.stats()["faults"]["throttle"] == 2


def test_a_key_revoked_after_k_requests_is_refused_from_then_on(sim: BSimulator, http: requests.Session) -> None:
    sim.set_faults(revoke_key_after=2)
    codes = [http.get(f"{sim.base_url}/counts") for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 401, 401]
    assert codes[3].json()["error"]["code"] == "unauthorized"
    sim.set_faults()
    assert http.get(f"{sim.base_url}/counts").status_code == 200


def test_server_errors_by_fraction_are_deterministic(sim: BSimulator, http: requests.Session) -> None:
    def run() -> list[int]:
        sim.set_faults(error_fraction=0.3, seed=5)
        return [http.get(f"{sim.base_url}/counts").status_code for _ in range(40)]

    first = run()
    assert first == run()
    assert 3 <= first.count(503) <= 25 and set(first) == {200, 503}
    assert sim.stats()["faults"]["error"] == 2 * first.count(503)


@pytest.mark.parametrize(
    "mode,exc",
    [
        ("close", requests.exceptions.ConnectionError),
        ("reset", requests.exceptions.ConnectionError),
        ("mid_body", requests.exceptions.ChunkedEncodingError),
    ],
)
def test_dropped_connections(sim: BSimulator, http: requests.Session, mode: str, exc: type[Exception]) -> None:
    sim.set_faults(drop_every=2, drop_mode=mode)
    assert http.get(f"{sim.base_url}/counts").status_code == 200
    with pytest.raises(exc):
        http.get(f"{sim.base_url}/counts").json()
    assert http.get(f"{sim.base_url}/counts").status_code == 200  # a fresh connection works
    assert sim.stats()["faults"]["drop"] == 1


def test_slow_pages(sim: BSimulator, http: requests.Session) -> None:
    sim.set_faults(slow_every=1, slow_seconds=0.3)
    t0 = time.perf_counter()
    assert http.get(f"{sim.base_url}/images").status_code == 200
    assert time.perf_counter() - t0 >= 0.3
    assert sim.stats()["faults"]["slow"] == 1


def test_forced_cursor_expiry_and_resume_by_updated_since(sim: BSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/images"
    want = page_all(http, url, limit=10)
    sim.set_faults(expire_every=2)
    got: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 10}
    while True:
        r = http.get(url, params=params)
        if r.status_code == 400:
            assert r.json()["error"]["code"] == "cursor_expired"
            params = {"limit": 10, "updated_since": got[-1]["updated_at"]}  # resume as B's README says
            continue
        body = r.json()
        got.extend(body["data"])
        if body["next_cursor"] is None:
            break
        params = {k: v for k, v in params.items() if k != "cursor"} | {"cursor": body["next_cursor"]}
    assert sim.stats()["faults"]["expire"] >= 2
    dedup = {r["id"]: r for r in got}  # resuming re-sends the last record: seen twice, never skipped
    assert len(got) > len(want) and list(dedup.values()) == want


def test_rate_limit_per_key(sim: BSimulator, http: requests.Session) -> None:
    sim.set_faults(rate_limit_per_second=3)
    codes = [http.get(f"{sim.base_url}/counts") for _ in range(20)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and int(limited[0].headers["Retry-After"]) >= 1
    assert sim.stats()["faults"]["rate_limit"] == len(limited)
    time.sleep(0.4)
    assert http.get(f"{sim.base_url}/counts").status_code == 200


def test_max_faults_caps_injection(sim: BSimulator, http: requests.Session) -> None:
    sim.set_faults(error_every=1, max_faults=2)
    codes = [http.get(f"{sim.base_url}/counts").status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]


# ---------------------------------------------------------------------- admin API and CLI


def test_admin_api_drives_everything(sim: BSimulator, http: requests.Session) -> None:
    admin = SimAdminClient(sim.base_url, KEY)
    assert admin.advance(60).startswith("2026-03-01T00:01:00")
    tree = admin.add_patient_tree(studies=1, series=1, images=2)
    assert sim.get("patients", tree["patient"]) is not None
    assert admin.update("images", tree["images"][0], number=99)["number"] == 99
    assert admin.update("patients", tree["patient"], remove=["birth_date"]).get("birth_date", "gone") == "gone"
    assert admin.delete("studies", tree["studies"][0]) == [tree["studies"][0], *tree["series"], *tree["images"]]
    assert admin.undelete("studies", tree["studies"][0], cascade=True)[0] == tree["studies"][0]
    assert admin.make_invalid("images", tree["images"][1], "relative_file_path")["file_path"][0] != "/"
    assert admin.repair("images", tree["images"][1])["file_path"][0] == "/"
    assert sum(admin.mutate_fraction(0.1, seed=1)["updated"].values()) > 0
    assert admin.file_bytes(tree["images"][0]) == sim.file_bytes(tree["images"][0])
    admin.set_faults(throttle_every=1)
    assert http.get(f"{sim.base_url}/counts").status_code == 429
    assert admin.stats()["faults"]["throttle"] == 1
    assert admin.config()["faults"]["throttle_every"] == 1
    admin.set_faults()
    assert http.get(f"{sim.base_url}/counts").status_code == 200
    admin.reset()
    assert sim.counts()["patients"] == 12 and sim.stats()["requests"] == 0
    assert sim.now_us() == parse("2026-03-01T00:00:00Z")
    r = http.post(f"{sim.admin_url}/mutate", json={"op": "update", "resource": "images", "id": "img_9"})
    assert r.status_code == 404
    r = http.post(f"{sim.admin_url}/mutate", json={"op": "explode"})
    assert r.status_code == 400


def test_cli_serves_until_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), BSIM_API_KEY=KEY)
    args = ["--patients", "3", "--images-per-series", "2", "--seed", "4", "--no-rate-limit"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", "0", *args], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid and info["base_url"].endswith("/api/v1")
        counts = requests.get(f"{info['base_url']}/counts", headers={"X-API-Key": KEY}, timeout=5).json()
        assert counts["patients"] == 3 and counts["images"] == 3 * 2 * 3 * 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_spawn_helper_and_default_rate_limit() -> None:
    with spawn(KEY, "--patients", "2", "--rate-limit", "3") as child:
        codes = [
            requests.get(f"{child.base_url}/counts", headers={"X-API-Key": KEY}, timeout=5).status_code
            for _ in range(10)
        ]
        assert 429 in codes
        assert child.admin.stats()["faults"]["rate_limit"] == codes.count(429)
    assert child.proc.returncode == 0


# ---------------------------------------------------------------------- scale


def test_ten_million_images_start_fast_and_page_in_bounded_memory() -> None:
    cfg = SimConfig(patients=10_000, studies_per_patient=5, series_per_study=4, images_per_series=50)
    assert cfg.total_images == 10_000_000
    tracemalloc.start()
    try:
        t0 = time.process_time()  # CPU time: other load on the machine must not fail the test
        cat = Catalogue(cfg)
        start_cpu = time.process_time() - t0
        old_t = parse(cat.get("images", "img_000005000000")["updated_at"])  # type: ignore[index]
        moved = cat.update("images", "img_000005000000", number=7)
        recs, after = cat.page("images", limit=1000, since=old_t - 1000 * 1_000_000)
        seen = {r["id"] for r in recs}
        for _ in range(20):
            recs, after = cat.page("images", limit=1000, after=after)
            seen.update(r["id"] for r in recs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(recs) == 1000 and after is not None and len(seen) == 21_000
    assert "img_000004999999" in seen and "img_000005000001" in seen
    assert "img_000005000000" not in seen  # served at its new position only
    assert cat.get("images", "img_000005000000") == moved
    assert start_cpu < 0.5
    assert peak < 30 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    assert cat.counts()["images"] == 10_000_000


def test_stop_start_is_an_outage_on_the_same_url(http: requests.Session) -> None:
    sim = BSimulator(manual(patients=2), api_key=KEY).start()
    try:
        url = f"{sim.base_url}/counts"
        assert http.get(url).status_code == 200  # leaves a pooled keep-alive connection
        sim.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            http.get(url, timeout=2)
        sim.start()
        assert sim.base_url + "/counts" == url
        assert http.get(url).status_code == 200
    finally:
        sim.stop()


def test_config_rejects_defects_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        SimConfig(defects={"img_000000000001": "missing_mrn"})
    with pytest.raises(ValueError):
        SimConfig(invalid_kinds=("no_such_kind",))
    with pytest.raises(ValueError):
        SimConfig(patients=0)
