"""The service-C simulator honours C's contract (source-c/README.md, openapi.yaml), and its
snapshots, mutations and faults really happen, over real HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
import referencing
import requests
import yaml
from botocore.config import Config

from devstack.s3 import put_objects, s3_server
from simulator_c import (
    BUCKETS,
    DEFECT_KINDS,
    FIELDS,
    KNOWN_CODES,
    SCHEMA_DEFECT_KINDS,
    Catalogue,
    CSimulator,
    FaultConfig,
    SimConfig,
    is_relative_key,
)
from simulator_c.client import CSimAdminClient, spawn
from simulator_c.model import rfc3339_ms

TOKEN = "c-test-token"
NO_READ = "c-no-read-token"
ROOT = Path(__file__).resolve().parents[1]
SPEC_COPY = ROOT / "simulator_c" / "openapi.yaml"
RESOURCES = ("participants", "visits", "acquisitions", "files")
BASE_MS = 1793664000000  # 2026-11-03T00:00:00Z, the manual clock's default start
IMF_FIXDATE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
    r"\d{2}:\d{2}:\d{2} GMT$"
)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def manual(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {"clock": "manual", "seed": 7}
    base.update(kw)
    return SimConfig(**base)


SMALL = {"participants": 12, "visits_per_participant": 2, "acquisitions_per_visit": 2, "files_per_acquisition": 4}
NO_LIMIT = FaultConfig(rate_limit=None)


@pytest.fixture
def sim() -> Iterator[CSimulator]:
    with CSimulator(manual(**SMALL), token=TOKEN, tokens={NO_READ: ()}, faults=NO_LIMIT) as s:
        yield s


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {TOKEN}"
        yield s


# ---------------------------------------------------------------------- the contract, as a checker


class Contract:
    """openapi.yaml as a response checker: body schema per path and status, required headers."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = referencing.Resource.from_contents(spec, default_specification=referencing.jsonschema.DRAFT202012)
        self.registry = referencing.Registry().with_resource("urn:c-openapi", resource)

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def schema(self, name: str) -> dict[str, Any]:
        return {"$ref": f"urn:c-openapi#/components/schemas/{name}"}

    def validate(self, instance: Any, schema: dict[str, Any]) -> None:
        jsonschema.Draft202012Validator(schema, registry=self.registry).validate(instance)

    def check(self, resp: requests.Response, template: str) -> Any:
        """Validate a response of path ``template`` (e.g. ``/files/{uuid}``) against the contract."""
        assert IMF_FIXDATE.match(resp.headers["Date"]), resp.headers.get("Date")
        op = self.spec["paths"][template]["get"]
        status = str(resp.status_code)
        declared = op["responses"].get(status) or op["responses"]["5XX"]
        assert status in op["responses"] or status in ("502", "504"), f"{template} does not list {status}"
        declared = self._resolve(declared)
        for name, header in declared.get("headers", {}).items():
            # Retry-After is promised on every 429 (README), optional on a 503.
            if self._resolve(header).get("required") or (name, status) == ("Retry-After", "429"):
                assert name in resp.headers, f"{status} without {name}"
            if name == "Retry-After" and name in resp.headers:
                assert IMF_FIXDATE.match(resp.headers[name])
        if "content" not in declared:
            return None
        body = resp.json()
        self.validate(body, _anchored(declared["content"]["application/json"]["schema"]))
        return body


def _anchored(node: Any) -> Any:
    """A schema of the spec with its local $refs pointed at the registered spec."""
    if isinstance(node, dict):
        return {k: ("urn:c-openapi" + v if k == "$ref" else _anchored(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_anchored(v) for v in node]
    return node


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract(yaml.safe_load(SPEC_COPY.read_text()))


def follow(http: requests.Session, url: str, contract: Contract | None = None, **params: Any) -> tuple[list, list]:
    """Every record of a window, following rel="next"; returns (records, responses)."""
    out: list[dict[str, Any]] = []
    responses = []
    template = "/" + url.rsplit("/v2/", 1)[1]
    r = http.get(url, params=params, timeout=10)
    while True:
        assert r.status_code == 200, r.text
        if contract is not None:
            contract.check(r, template)
        responses.append(r)
        out.extend(r.json())
        nxt = r.links.get("next")
        if nxt is None:
            return out, responses
        r = http.get(nxt["url"], timeout=10)


def order_key(rec: dict[str, Any]) -> tuple[int, str]:
    return rec["modified"], rec["uuid"]


def is_imf(value: str) -> bool:
    return IMF_FIXDATE.match(value) is not None


# ---------------------------------------------------------------------- contract copy and conformance


def _shared_contract() -> Path | None:
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "contracts" / "source-c" / "openapi.yaml"
        if path.exists():
            return path
    return None


@pytest.mark.skipif(_shared_contract() is None, reason="shared/contracts is not beside this checkout")
def test_openapi_copy_is_the_contract() -> None:
    shared = _shared_contract()
    assert shared is not None
    assert SPEC_COPY.read_bytes() == shared.read_bytes()


def test_every_response_conforms_to_openapi(contract: Contract, http: requests.Session) -> None:
    cfg = manual(
        **SMALL, awkward_fraction=0.6, null_fraction=0.4, nul_fraction=0.2, invalid_fraction=0.4,
        deleted_fraction=0.05, late_parent_fraction=0.1,
    )  # fmt: skip
    with CSimulator(cfg, token=TOKEN, tokens={NO_READ: ()}, faults=NO_LIMIT) as s:
        s.advance(10)
        s.mutate_fraction(0.3, seed=1)
        for resource in RESOURCES:
            records, _ = follow(http, f"{s.base_url}/{resource}", contract, page_size=7)
            assert records == list(s.live_records(resource))
            for rec in records:
                assert set(rec) == {"uuid", "modified", *FIELDS[resource]}  # every field, always present
            for rec in records[:5]:
                contract.check(http.get(f"{s.base_url}/{resource}/{rec['uuid']}"), f"/{resource}/{{uuid}}")
        items, _ = follow(http, f"{s.base_url}/deletions", contract, page_size=3)
        assert items and items == s.deletions()
        stats = contract.check(http.get(f"{s.base_url}/stats"), "/stats")
        assert stats["as_of"] == rfc3339_ms(s.now_ms())
        # Error answers have the shapes the contract lists per status.
        uuid = s.uuid("files", 0)
        checks = [
            (http.get(f"{s.base_url}/files", params={"page_size": 501}), "/files", 400, "invalid_parameter"),
            (requests.get(f"{s.base_url}/files", timeout=5), "/files", 401, "unauthenticated"),
            (
                requests.get(f"{s.base_url}/stats", headers={"Authorization": f"Bearer {NO_READ}"}, timeout=5),
                "/stats",
                403,
                "insufficient_scope",
            ),
            (http.get(f"{s.base_url}/files/{uuid[:-1]}0x"), "/files/{uuid}", 404, "not_found"),
            (http.get(f"{s.base_url}/files", params={"snapshot": "never-issued"}), "/files", 410, "snapshot_expired"),
        ]
        for code, fault in [
            (429, {"throttle_every": 1}),
            (500, {"internal_every": 1}),
            (503, {"unavailable_every": 1}),
        ]:
            s.set_faults(rate_limit=None, **fault)
            checks.append((http.get(f"{s.base_url}/visits"), "/visits", code, None))
        s.set_faults(rate_limit=None, gateway_every=1)
        contract.check(http.get(f"{s.base_url}/visits"), "/visits")  # 5XX: no JSON body required
        for resp, template, status, code in checks:
            assert resp.status_code == status, (template, resp.text)
            body = contract.check(resp, template)
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
            if code is not None:
                assert body["error"]["code"] == code
        assert checks[1][0].headers["WWW-Authenticate"] == 'Bearer realm="c-archive"'


def test_catalogue_has_every_shape_the_contract_allows() -> None:
    cfg = manual(participants=80, awkward_fraction=0.5, null_fraction=0.3, invalid_fraction=0.3)
    cat = Catalogue(cfg)
    parts = list(cat.live_records("participants"))
    visits = list(cat.live_records("visits"))
    acqs = list(cat.live_records("acquisitions"))
    files = list(cat.live_records("files"))
    names = [p["display_name"] for p in parts]
    assert None in names and "" in names
    assert any(n and "," not in n for n in names) and any(n and n.count(",") > 1 for n in names)
    assert any(n and ("^" in n or "=" in n) for n in names)
    assert any(n and ("\u3000" in n or "\u00a0" in n or "\u2003" in n) for n in names)
    assert any(n and re.search("[\uac00-\ud7a3]", n) for n in names)  # Korean
    assert any(n and re.search("[\u3040-\u30ff\u4e00-\u9fff]", n) for n in names)  # Japanese
    assert any(p["identifiers"]["other"] == [] for p in parts) and any(
        len(p["identifiers"]["other"]) == 2 for p in parts
    )
    assert {p["sex"] for p in parts} >= {"m", "f", "x", "u", None}
    assert any(p["dob"] is None for p in parts) and any(isinstance(p["dob"], str) and len(p["dob"]) == 8 for p in parts)
    started = [v["started"] for v in visits]
    assert None in started and {s[19:] for s in started if s and len(s) > 19} >= {"Z", "+09:00", "-05:00"}
    assert any(v["accession"] is None for v in visits) and any(v["label"] is None for v in visits)
    assert len({v["study_instance_uid"] for v in visits}) < len(visits), "DICOM UIDs are not unique in C"
    series_no = {a["series_no"] for a in acqs}
    assert None in series_no and any(isinstance(n, str) and n.startswith(("0", "+")) for n in series_no)
    assert {a["modality"] for a in acqs} >= {"mr", "ct", "pet_ct"} and None in {a["anatomy"] for a in acqs}
    by_acq: dict[str, set[str]] = {}
    for f in files:
        by_acq.setdefault(f["acquisition"], set()).add(f["object"]["bucket"])
    assert any(b == set(BUCKETS) for b in by_acq.values()), "both buckets within one acquisition"
    assert any(f["sha256"] is None for f in files) and any(f["bytes"] is None for f in files)
    for f in files:
        data = cat.file_bytes(f["uuid"])
        if f["sha256"] is not None:
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
        if isinstance(f["bytes"], int) and f["bytes"] < 1 << 40:
            assert f["bytes"] == len(data)
    for recs in (parts, visits, acqs, files):
        modified = [r["modified"] for r in recs]
        assert len(set(modified)) < len(modified), "records share modified values"
        assert [order_key(r) for r in recs] == sorted(order_key(r) for r in recs)
        assert all(UUID_RE.match(r["uuid"]) for r in recs) and len({r["uuid"] for r in recs}) == len(recs)
    # The uuid order is not the generation order: (modified, uuid) ties really need the uuid.
    tied = [r for r in files if sum(x["modified"] == r["modified"] for x in files) > 1]
    assert tied and [r["uuid"] for r in tied] != [cat.uuid("files", i) for i in range(len(tied))]
    nul = Catalogue(manual(participants=20, nul_fraction=0.3))
    texts = [p["display_name"] for p in nul.live_records("participants")]
    texts += [v["label"] for v in nul.live_records("visits")] + [a["notes"] for a in nul.live_records("acquisitions")]
    assert any(t and "\x00" in t for t in texts)  # A stores these with the NUL removed


# ---------------------------------------------------------------------- windows, paging, snapshots


def test_paging_follows_links_with_total_count_and_no_gaps(sim: CSimulator, http: requests.Session) -> None:
    everything = list(sim.live_records("files"))
    lo, hi = everything[len(everything) // 5]["modified"], everything[4 * len(everything) // 5]["modified"]
    got, responses = follow(http, f"{sim.base_url}/files", modified_from=lo, modified_to=hi, page_size=9)
    want = [r for r in everything if lo <= r["modified"] < hi]
    assert got == want and len({r["uuid"] for r in got}) == len(got)
    assert {r.headers["X-Total-Count"] for r in responses} == {str(len(want))}
    assert all(len(r.json()) == 9 for r in responses[:-1]) and "Link" not in responses[-1].headers
    link = responses[0].headers["Link"]
    url = link[1 : link.index(">")]
    assert link.endswith('; rel="next"') and url.startswith(sim.base_url + "/files?")
    assert f"modified_from={lo}" in url and f"modified_to={hi}" in url and "page=2" in url and "snapshot=" in url
    # Past the end: 200 [] without Link; an empty window (from == to) too.
    snap_url = url.replace("page=2", "page=999")
    past = http.get(snap_url)
    assert past.status_code == 200 and past.json() == [] and "Link" not in past.headers
    empty = http.get(f"{sim.base_url}/files", params={"modified_from": lo, "modified_to": lo})
    assert empty.json() == [] and empty.headers["X-Total-Count"] == "0" and "Link" not in empty.headers
    # Defaults: page 1 of 100.
    default = http.get(f"{sim.base_url}/files")
    assert default.json() == everything[:100] and default.headers["X-Total-Count"] == str(len(everything))


def test_window_is_half_open_on_modified(sim: CSimulator, http: requests.Session) -> None:
    rec = list(sim.live_records("acquisitions"))[10]
    t = rec["modified"]
    inside, _ = follow(http, f"{sim.base_url}/acquisitions", modified_from=t, modified_to=t + 1)
    assert rec in inside and {r["modified"] for r in inside} == {t}
    before, _ = follow(http, f"{sim.base_url}/acquisitions", modified_to=t)
    after, _ = follow(http, f"{sim.base_url}/acquisitions", modified_from=t + 1)
    assert rec not in before and rec not in after
    assert len(before) + len(inside) + len(after) == sim.counts()["acquisitions"]


def test_snapshot_pins_the_view_while_the_catalogue_changes(sim: CSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/files"
    pinned = list(sim.live_records("files"))
    first = http.get(url, params={"page_size": 10})
    assert first.json() == pinned[:10]
    # Change records on later pages, delete some, add some, move one into the first page's past.
    sim.advance(60)
    sim.update("files", pinned[30]["uuid"], index=999)
    sim.delete("files", pinned[40]["uuid"])
    sim.add("files", pinned[0]["acquisition"])
    sim.move_file(pinned[50]["uuid"])
    sim.mutate_fraction(0.2, seed=4)
    rest, responses = follow(http, first.links["next"]["url"])
    assert pinned[:10] + rest == pinned  # no gap, no overlap, each as it stood when pinned
    assert {r.headers["X-Total-Count"] for r in responses} == {str(len(pinned))}
    # A page fetched again gives the same records; page_size may change within the snapshot.
    page3 = first.links["next"]["url"].replace("page=2", "page=3")
    assert http.get(page3).json() == pinned[20:30]
    other_size = page3.replace("page_size=10", "page_size=4")
    assert http.get(other_size).json() == pinned[8:12]
    # A new request without snapshot sees the changes.
    now, _ = follow(http, url, page_size=500)
    assert now == list(sim.live_records("files")) != pinned


def test_concurrent_mutations_never_cause_gaps_or_overlaps(http: requests.Session) -> None:
    cfg = SimConfig(seed=3, participants=30, files_per_acquisition=5)  # real clock, 600 files
    with CSimulator(cfg, token=TOKEN, faults=NO_LIMIT) as s:
        stop = threading.Event()

        def churn() -> None:
            # Changes keep coming while the pages are read, paced so that the server's thread gets
            # the GIL too (a tight loop starved it into read timeouts on a busy 2-core machine).
            i = 0
            while not stop.wait(0.02) and i < 500:
                s.mutate_fraction(0.02, seed=i)
                i += 1

        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        try:
            for _ in range(3):
                first = http.get(f"{s.base_url}/files", params={"page_size": 25})
                sid = first.links["next"]["url"].rsplit("snapshot=", 1)[1]
                snap = s.snapshot(sid)
                assert snap is not None
                rest, _ = follow(http, first.links["next"]["url"])
                got = first.json() + rest
                assert got == list(s.records("files", view=snap.view))
                assert len(got) == int(first.headers["X-Total-Count"]) == len({r["uuid"] for r in got})
                assert [order_key(r) for r in got] == sorted(order_key(r) for r in got)
        finally:
            stop.set()
            worker.join(10)


@pytest.mark.parametrize("seed", [1, 2])
def test_snapshot_pages_match_brute_force_over_random_windows(seed: int) -> None:
    cfg = manual(
        **SMALL, seed=seed, shared_modified_fraction=0.6, history_seconds=20.0, deleted_fraction=0.1,
        late_parent_fraction=0.2, late_parent_delay_seconds=5,
    )  # fmt: skip
    cat = Catalogue(cfg)
    rng = random.Random(seed)
    kept: list[tuple[Any, list[dict[str, Any]]]] = []
    for step in range(4):
        cat.advance(0 if step == 1 else 5)
        cat.mutate_fraction(0.2, seed=step)
        for resource in (*RESOURCES, "deletions"):
            everything = list(cat.records(resource, chunk=7))
            key = (lambda d: (d["deleted"], d["resource"], d["uuid"])) if resource == "deletions" else order_key
            assert [key(r) for r in everything] == sorted(key(r) for r in everything)
            if resource != "deletions":
                assert cat.counts()[resource] == len(everything)
            instants = [r["deleted" if resource == "deletions" else "modified"] for r in everything] or [BASE_MS]
            for _ in range(6):
                a, b = sorted(rng.choice(instants) + rng.choice((-1, 0, 1)) for _ in range(2))
                lo = a if rng.random() < 0.8 else None
                hi = b if rng.random() < 0.8 else None
                want = [r for r in everything if (lo is None or lo <= key(r)[0]) and (hi is None or key(r)[0] < hi)]
                snap = cat.pin(resource, lo, hi)
                assert snap.total == len(want)
                size = rng.randint(1, 6)
                got = []
                for page in range(1, len(want) // size + 2):
                    got.extend(cat.page(snap, page, size))
                assert got == want
                kept.append((snap, want))
    # Every snapshot still serves what it pinned, in any page order, after all later changes.
    for snap, want in kept:
        size = 3
        pages = list(range(1, len(want) // size + 2))
        rng.shuffle(pages)
        got = {p: cat.page(snap, p, size) for p in pages}
        assert [r for p in sorted(got) for r in got[p]] == want


def test_far_pages_are_found_by_counting_and_match_the_listing() -> None:
    cfg = manual(participants=40, files_per_acquisition=20, shared_modified_fraction=0.7, history_seconds=60.0)
    cat = Catalogue(cfg)
    cat.advance(1)
    cat.mutate_fraction(0.1, seed=9)
    lo = list(cat.live_records("files"))[150]["modified"]
    snap = cat.pin("files", lo, None)
    cat.mutate_fraction(0.1, seed=10)  # after pinning: must not show
    want = [r for r in cat.records("files", view=snap.view) if r["modified"] >= lo]
    assert snap.total == len(want) > 2500
    pages = list(range(len(want) // 90 + 2, 0, -1))
    got = {p: cat.page(snap, p, 90) for p in pages}  # last first: no known page end before any of them
    assert [r for p in sorted(got) for r in got[p]] == want


def test_snapshot_expires_after_its_lifetime_on_the_simulator_clock(sim: CSimulator, http: requests.Session) -> None:
    first = http.get(f"{sim.base_url}/visits", params={"page_size": 5})
    nxt = first.links["next"]["url"]
    sim.advance(899)
    assert http.get(nxt).status_code == 200  # using it does not extend it
    sim.advance(1)
    gone = http.get(nxt)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "snapshot_expired"
    assert http.get(nxt).status_code == 410
    assert sim.stats()["snapshots_gone"] == 2
    # Never issued -> 410; not even snapshot-shaped -> 400.
    assert http.get(f"{sim.base_url}/visits", params={"snapshot": "AAAAAAAAAAAAAAAA"}).status_code == 410
    bad = http.get(f"{sim.base_url}/visits", params={"snapshot": "no/t*valid"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"
    with CSimulator(manual(**SMALL, snapshot_ttl_seconds=10), token=TOKEN, faults=NO_LIMIT) as short:
        nxt = http.get(f"{short.base_url}/files", params={"page_size": 5}).links["next"]["url"]
        short.advance(10)
        assert http.get(nxt).status_code == 410


def test_snapshot_mismatch(sim: CSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/files"
    first = http.get(url, params={"modified_from": 0, "modified_to": BASE_MS, "page_size": 5})
    sid = first.links["next"]["url"].rsplit("snapshot=", 1)[1]
    ok = http.get(url, params={"modified_from": 0, "modified_to": BASE_MS, "page": 3, "page_size": 2, "snapshot": sid})
    assert ok.status_code == 200 and ok.json() == list(sim.live_records("files"))[4:6]
    for params, path in [
        ({"modified_from": 0, "modified_to": BASE_MS}, "acquisitions"),
        ({"modified_from": 1, "modified_to": BASE_MS}, "files"),
        ({"modified_from": 0}, "files"),
        ({"modified_to": BASE_MS}, "files"),
        ({"modified_from": 0, "modified_to": BASE_MS}, "deletions"),
    ]:
        r = http.get(f"{sim.base_url}/{path}", params={**params, "snapshot": sid, "page": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "snapshot_mismatch", (params, path)


@pytest.mark.parametrize(
    "params",
    [
        {"page_size": "0"},
        {"page_size": "501"},
        {"page": "0"},
        {"page": "-1"},
        {"page": "+1"},
        {"page": " 1"},
        {"page": "1.0"},
        {"page": ""},
        {"page": "\u0661"},
        {"modified_from": "-1"},
        {"modified_from": "253402300800000"},
        {"modified_to": "1e12"},
        {"modified_from": "2026-11-03T00:00:00Z"},
        {"modified_from": "10", "modified_to": "9"},
        {"limit": "10"},
        {"cursor": "x"},
    ],
)
def test_invalid_parameters_are_400(sim: CSimulator, http: requests.Session, params: dict[str, str]) -> None:
    for path in ("files", "deletions"):
        r = http.get(f"{sim.base_url}/{path}", params=params)
        assert r.status_code == 400, (path, params)
        assert r.json()["error"]["code"] == "invalid_parameter"


def test_repeated_and_stray_parameters_are_400(sim: CSimulator, http: requests.Session) -> None:
    uuid = sim.uuid("visits", 1)
    for url in (
        f"{sim.base_url}/visits?page=1&page=2",
        f"{sim.base_url}/visits?modified_from=1&modified_from=1",
        f"{sim.base_url}/stats?page=1",
        f"{sim.base_url}/visits/{uuid}?page=1",
    ):
        r = http.get(url)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter", url
    assert http.get(f"{sim.base_url}/visits/{uuid}").status_code == 200
    assert http.get(f"{sim.base_url}/visits", params={"modified_to": "253402300799999"}).status_code == 200


def test_unknown_paths_and_records_are_404(sim: CSimulator, http: requests.Session) -> None:
    uuid = sim.uuid("files", 3)
    sim.delete("files", uuid)
    for url in (
        f"{sim.root_url}/",
        f"{sim.root_url}/v3/files",
        f"{sim.base_url}/series",
        f"{sim.base_url}/files/{uuid}/extra",
        f"{sim.base_url}/files/{uuid}",  # deleted
        f"{sim.base_url}/files/{sim.uuid('files', 4).upper()}",
        f"{sim.base_url}/files/not-a-uuid",
        f"{sim.base_url}/visits/{sim.uuid('files', 4)}",  # a file's uuid is no visit
        f"{sim.base_url}/files/{sim.uuid('files', 10**6)}",  # never created
        f"{sim.base_url}/files/5d829a80-b8ec-4254-b5c5-b9ccc45bb60e",
    ):
        r = http.get(url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", url
        assert is_imf(r.headers["Date"])


# ---------------------------------------------------------------------- authentication


def test_token_is_checked_before_anything_else(sim: CSimulator) -> None:
    sim.set_faults(rate_limit=1, internal_every=1)
    urls = (f"{sim.base_url}/files", f"{sim.base_url}/stats", f"{sim.root_url}/nope", f"{sim.admin_url}/stats")
    for url in urls:
        for auth in (None, "Basic Yzp0", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"Token {TOKEN}", f"Bearer  {TOKEN}"):
            headers = {"Authorization": auth} if auth is not None else {}
            for _ in range(2):  # the limit (1/s) is not what answers
                r = requests.get(url, headers=headers, timeout=5)
                assert r.status_code == 401, (url, auth)
                assert r.json()["error"]["code"] == "unauthenticated"
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="c-archive"'
        for _ in range(3):
            r = requests.get(url, headers={"Authorization": f"Bearer {NO_READ}"}, timeout=5)
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    # Then 429 (the limit), then the injected fault.
    good = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    codes = [requests.get(urls[0], headers=good, timeout=5).status_code for _ in range(3)]
    assert codes == [500, 429, 429]
    stats = sim.stats()
    assert stats["faults"]["internal"] == 1 and stats["faults"]["rate_limit"] == 2
    assert stats["responses"]["401"] == 4 * 7 * 2 and stats["responses"]["403"] == 4 * 3


# ---------------------------------------------------------------------- deletions, restores, moves


def test_deletion_feed_restore_and_children(sim: CSimulator, http: requests.Session) -> None:
    visit = list(sim.live_records("visits"))[3]
    children = [a for a in sim.live_records("acquisitions") if a["visit"] == visit["uuid"]]
    assert len(children) == 2
    before = sim.counts()
    sim.advance(10)
    item = sim.delete("visits", visit["uuid"])
    assert item == {"resource": "visits", "uuid": visit["uuid"], "deleted": sim.now_ms()}
    assert sim.delete("visits", visit["uuid"]) is None  # already deleted: no second item
    assert http.get(f"{sim.base_url}/visits/{visit['uuid']}").status_code == 404
    after = sim.counts()
    assert after["visits"] == before["visits"] - 1 and after["acquisitions"] == before["acquisitions"]
    # Children stay live in their lists, in /stats and at their record endpoint, pointing at it.
    acqs, _ = follow(http, f"{sim.base_url}/acquisitions")
    assert all(c in acqs for c in children)
    assert http.get(f"{sim.base_url}/acquisitions/{children[0]['uuid']}").json()["visit"] == visit["uuid"]
    visits, _ = follow(http, f"{sim.base_url}/visits")
    assert visit["uuid"] not in {v["uuid"] for v in visits}
    # Restore: reappears with a modified newer than its deletion, same uuid; delete again: 2nd item.
    sim.advance(5)
    back = sim.restore("visits", visit["uuid"])
    assert back is not None and back["modified"] > item["deleted"]
    assert {k: v for k, v in back.items() if k != "modified"} == {k: v for k, v in visit.items() if k != "modified"}
    assert sim.restore("visits", visit["uuid"]) is None
    again = sim.delete("visits", visit["uuid"])
    assert again is not None and again["deleted"] > back["modified"]
    sim.delete("files", sim.uuid("files", 0))
    sim.delete("acquisitions", children[1]["uuid"])
    feed, responses = follow(http, f"{sim.base_url}/deletions", page_size=2)
    assert feed == sim.deletions() and len(feed) == 4
    assert [(d["deleted"], d["resource"], d["uuid"]) for d in feed] == sorted(
        (d["deleted"], d["resource"], d["uuid"]) for d in feed
    )
    assert [d for d in feed if d["uuid"] == visit["uuid"]] == [item, again]
    assert responses[0].headers["X-Total-Count"] == "4"
    # The window bounds `deleted`; the feed's snapshot pins it like a list's.
    window, _ = follow(http, f"{sim.base_url}/deletions", modified_from=item["deleted"] + 1)
    assert item not in window and again in window
    first = http.get(f"{sim.base_url}/deletions", params={"page_size": 1})
    sim.delete("participants", sim.uuid("participants", 0))
    rest, _ = follow(http, first.links["next"]["url"])
    assert first.json() + rest == feed


def test_merge_participants_moves_visits_and_deletes_the_source(sim: CSimulator, http: requests.Session) -> None:
    p, q = sim.uuid("participants", 2), sim.uuid("participants", 5)
    old = {v["uuid"]: v for v in sim.live_records("visits") if v["participant"] == p}
    assert len(old) == 2
    sim.advance(30)
    merged = sim.merge_participants(p, q)
    assert set(merged["moved"]) == set(old) and merged["deleted"]["uuid"] == p
    for uuid, v in old.items():
        new = http.get(f"{sim.base_url}/visits/{uuid}").json()
        assert new["participant"] == q and new["modified"] > v["modified"]
    window, _ = follow(http, f"{sim.base_url}/visits", modified_from=sim.now_ms())
    assert set(old) <= {v["uuid"] for v in window}
    assert http.get(f"{sim.base_url}/participants/{p}").status_code == 404
    assert {"resource": "participants", "uuid": p, "deleted": merged["deleted"]["deleted"]} in sim.deletions()
    # Acquisitions and files move the same way.
    acq = sim.uuid("acquisitions", 0)
    moved = sim.move("acquisitions", acq, sim.uuid("visits", 9))
    assert moved["visit"] == sim.uuid("visits", 9)
    f = sim.move("files", sim.uuid("files", 0), sim.uuid("acquisitions", 7))
    assert f["acquisition"] == sim.uuid("acquisitions", 7)


def test_file_moved_to_the_other_bucket(sim: CSimulator) -> None:
    uuid = sim.uuid("files", 5)
    rec = sim.get("files", uuid)
    assert rec is not None
    sim.advance(1)
    moved = sim.move_file(uuid)
    assert moved["object"]["key"] == rec["object"]["key"] and moved["object"]["bucket"] != rec["object"]["bucket"]
    assert {moved["object"]["bucket"], rec["object"]["bucket"]} == set(BUCKETS)
    assert moved["modified"] > rec["modified"] and moved["sha256"] == rec["sha256"]
    objects = dict(sim.iter_files())
    old_obj = (rec["object"]["bucket"], rec["object"]["key"])
    new_obj = (moved["object"]["bucket"], moved["object"]["key"])
    assert objects[old_obj] == objects[new_obj] == sim.file_bytes(uuid)  # the old object stays readable
    assert old_obj not in dict(sim.iter_files(include_moved=False))


def test_commit_delay_makes_changes_visible_late(http: requests.Session) -> None:
    with CSimulator(manual(**SMALL, commit_delay_seconds=5), token=TOKEN, faults=NO_LIMIT) as s:
        uuid = s.uuid("visits", 4)
        s.advance(60)
        changed = s.update("visits", uuid, label="amended")
        gone = s.delete("files", s.uuid("files", 1))
        assert gone is not None
        assert s.get("visits", uuid)["label"] != "amended"  # type: ignore[index]
        pinned = http.get(f"{s.base_url}/visits", params={"page_size": 5})
        assert s.counts()["files"] == s.config.total_files and s.deletions() == []
        window = {"modified_from": changed["modified"] - 1000, "modified_to": changed["modified"] + 1}
        assert http.get(f"{s.base_url}/visits", params=window).json() == []  # not yet committed
        s.advance(5)
        assert http.get(f"{s.base_url}/visits", params=window).json() == [changed]  # appears in a past window
        assert s.get("visits", uuid) == changed and s.deletions() == [gone]
        assert s.counts()["files"] == s.config.total_files - 1
        rest, _ = follow(http, pinned.links["next"]["url"])
        assert changed not in pinned.json() + rest  # the snapshot pinned before the commit


def test_history_holds_late_parents_and_deletions() -> None:
    def children_before_parents(cat: Catalogue) -> int:
        t = {r["uuid"]: r["modified"] for res in RESOURCES for r in cat.live_records(res)}
        links = [("visits", "participant"), ("acquisitions", "visit"), ("files", "acquisition")]
        return sum(t[r["uuid"]] < t[r[link]] for res, link in links for r in cat.live_records(res) if r[link] in t)

    assert children_before_parents(Catalogue(manual(**SMALL))) == 0  # the base layout: parents first
    cat = Catalogue(manual(**SMALL, late_parent_fraction=0.25, deleted_fraction=0.1))
    assert children_before_parents(cat) > 5
    items = cat.deletions()
    assert {d["resource"] for d in items} == set(RESOURCES) and all(d["deleted"] < BASE_MS for d in items)
    gone = {d["uuid"] for d in items}
    counts = cat.counts()
    for resource, n in zip(RESOURCES, cat.config.sizes, strict=True):
        live = {r["uuid"] for r in cat.live_records(resource)}
        assert not live & gone and counts[resource] == len(live) == n - sum(d["resource"] == resource for d in items)
    # Children of a parent deleted in the history are still live and point at it (C publishes nothing for them).
    assert any(a["visit"] in gone for a in cat.live_records("acquisitions"))
    back = cat.restore("files", next(d["uuid"] for d in items if d["resource"] == "files"))
    assert back is not None and back["modified"] >= BASE_MS
    cat.reset()
    assert cat.deletions() == items


# ---------------------------------------------------------------------- stats, defects, determinism


def test_stats_counts_live_records(sim: CSimulator, http: requests.Session) -> None:
    sim.advance(1)
    summary = sim.mutate_fraction(0.3, seed=3)
    assert sum(summary["updated"].values()) and sum(summary["deleted"].values()) and sum(summary["added"].values())
    body = http.get(f"{sim.base_url}/stats").json()
    assert body["as_of"] == rfc3339_ms(sim.now_ms()) and re.fullmatch(r"2026-11-03T00:00:0\d\.\d{3}Z", body["as_of"])
    for resource in RESOURCES:
        live, _ = follow(http, f"{sim.base_url}/{resource}", page_size=500)
        assert body[resource] == len(live) == len(list(sim.live_records(resource)))


def test_defects_are_injected_explicit_and_queryable() -> None:
    cfg = manual(participants=60, invalid_fraction=0.5, defects={"files:2": "wrong_type", "visits:0": "bad_link"})
    cat = Catalogue(cfg)
    for resource in RESOURCES:
        found = cat.defects(resource)
        assert set(found.values()) - set(SCHEMA_DEFECT_KINDS[resource]) == set(DEFECT_KINDS[resource]), resource
        recs = {r["uuid"]: r for r in cat.live_records(resource)}
        for uuid, kind in found.items():
            assert held_back(resource, recs[uuid]), (resource, kind, recs[uuid])
        clean = [r for u, r in recs.items() if u not in found]
        assert clean and not any(held_back(resource, r) for r in clean), resource
    assert cat.defects("files")[cat.uuid("files", 2)] == "wrong_type"
    assert cat.defects("visits")[cat.uuid("visits", 0)] == "bad_link"
    assert "wrong_type" not in Catalogue(manual(participants=60, invalid_fraction=0.5)).defects("files").values()
    # make_invalid / repair
    plain = Catalogue(manual(**SMALL))
    uuid = plain.uuid("files", 3)
    bad = plain.make_invalid("files", uuid, "bucket_not_allowed")
    assert bad["object"]["bucket"] not in BUCKETS and plain.defects("files") == {uuid: "bucket_not_allowed"}
    fixed = plain.repair("files", uuid)
    assert fixed["object"]["bucket"] in BUCKETS and plain.defects("files") == {} and not held_back("files", fixed)
    with pytest.raises(ValueError):
        plain.make_invalid("files", uuid, "empty_mrn")
    with pytest.raises(ValueError):
        SimConfig(defects={"files:1": "empty_mrn"})


def held_back(resource: str, rec: dict[str, Any]) -> bool:
    """c-to-a.md's rules for records A must hold back, written out independently of the simulator."""

    def uuid_ok(v: Any) -> bool:
        return isinstance(v, str) and UUID_RE.match(v) is not None

    def text(v: Any) -> bool:
        return isinstance(v, str) and v != ""

    def code(name: str, v: Any) -> bool:
        return v in KNOWN_CODES[name]

    if resource == "participants":
        ids = rec["identifiers"]
        if not isinstance(ids, dict) or not text(ids.get("mrn")):
            return True
        dob = rec["dob"]
        if dob is not None:
            if not (isinstance(dob, str) and re.fullmatch(r"[0-9]{8}", dob, re.ASCII)):
                return True
            try:
                time.strptime(dob, "%Y%m%d")
            except ValueError:
                return True
        return not code("sex", rec["sex"])
    if resource == "visits":
        started = rec["started"]
        if started is not None:
            m = isinstance(started, str) and re.fullmatch(
                r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", started, re.ASCII
            )
            if not m:
                return True
            try:
                time.strptime(started[:19], "%Y-%m-%dT%H:%M:%S")
            except ValueError:
                return True
        return not (uuid_ok(rec["participant"]) and text(rec["study_instance_uid"]) and code("state", rec["state"]))
    if resource == "acquisitions":
        n = rec["series_no"]
        if n is not None:
            if not isinstance(n, str) or not re.fullmatch(r"[+-]?[0-9]+", n, re.ASCII):
                return True
            if not -(2**31) <= int(n) < 2**31:
                return True
        codes = code("modality", rec["modality"]) and code("anatomy", rec["anatomy"]) and code("side", rec["side"])
        return not (uuid_ok(rec["visit"]) and text(rec["series_instance_uid"]) and codes)
    obj = rec["object"]
    if not isinstance(obj, dict) or obj.get("bucket") not in BUCKETS or not is_relative_key(obj.get("key")):
        return True
    for name, limit in (("index", 2**31), ("bytes", 2**63)):
        v = rec[name]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not -limit <= v < limit):
            return True
    return not (uuid_ok(rec["acquisition"]) and text(rec["sop_instance_uid"]))


def test_same_seed_same_data_other_seed_other_data() -> None:
    cfg = {**SMALL, "awkward_fraction": 0.5, "invalid_fraction": 0.1}
    a, b = Catalogue(manual(**cfg)), Catalogue(manual(**cfg))
    for cat in (a, b):
        cat.advance(5)
        cat.mutate_fraction(0.3, seed=11)
    c = Catalogue(manual(**{**cfg, "seed": 8}))
    for resource in RESOURCES:
        ra = list(a.live_records(resource))
        assert ra == list(b.live_records(resource))
        assert ra != list(c.live_records(resource))
        assert a.defects(resource) == b.defects(resource)
    assert a.deletions() == b.deletions() and a.deletions()
    assert dict(a.iter_files()) == dict(b.iter_files())


def test_http_determinism_across_instances(http: requests.Session) -> None:
    bodies = []
    for _ in range(2):
        with CSimulator(manual(**SMALL), token=TOKEN, faults=NO_LIMIT) as s:
            bodies.append([follow(http, f"{s.base_url}/{r}", page_size=50)[0] for r in RESOURCES])
    assert bodies[0] == bodies[1]


# ---------------------------------------------------------------------- faults


def test_throttle_429_has_an_http_date_retry_after(sim: CSimulator, http: requests.Session) -> None:
    sim.set_faults(rate_limit=None, throttle_every=3, throttle_retry_after=2)
    resps = [http.get(f"{sim.base_url}/stats") for _ in range(6)]
    assert [r.status_code for r in resps] == [200, 200, 429, 200, 200, 429]
    r = resps[2]
    assert r.json()["error"]["code"] == "rate_limited" and is_imf(r.headers["Retry-After"])
    wait = parsedate_to_datetime(r.headers["Retry-After"]) - parsedate_to_datetime(r.headers["Date"])
    assert wait.total_seconds() == 2
    assert sim.stats()["faults"]["throttle"] == 2


def test_unavailable_internal_and_gateway_errors(sim: CSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/files"
    sim.set_faults(rate_limit=None, unavailable_every=1, unavailable_retry_after=3)
    r = http.get(url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert (parsedate_to_datetime(r.headers["Retry-After"]) - parsedate_to_datetime(r.headers["Date"])).seconds == 3
    sim.set_faults(rate_limit=None, unavailable_every=1)
    r = http.get(url)
    assert r.status_code == 503 and "Retry-After" not in r.headers
    sim.set_faults(rate_limit=None, internal_fraction=0.3, seed=5)
    codes = [http.get(url).status_code for _ in range(30)]
    assert set(codes) == {200, 500} and 2 <= codes.count(500) <= 20
    sim.set_faults(rate_limit=None, internal_fraction=0.3, seed=5)
    assert [http.get(url).status_code for _ in range(30)] == codes  # deterministic by request number
    for status, body in ((502, "html"), (504, "empty"), (502, "empty")):
        sim.set_faults(rate_limit=None, gateway_every=1, gateway_status=status, gateway_body=body)
        r = http.get(url)
        assert r.status_code == status
        assert (r.content == b"") == (body == "empty") and "json" not in r.headers.get("Content-Type", "")
        with pytest.raises(ValueError):
            r.json()
    assert sim.stats()["faults"]["gateway"] == 3 and sim.stats()["faults"]["internal"] == 2 * codes.count(500)


@pytest.mark.parametrize(
    "mode,exc",
    [
        ("close", requests.exceptions.ConnectionError),
        ("reset", requests.exceptions.ConnectionError),
        ("mid_body", requests.exceptions.ChunkedEncodingError),
    ],
)
def test_dropped_connections(sim: CSimulator, http: requests.Session, mode: str, exc: type[Exception]) -> None:
    sim.set_faults(rate_limit=None, drop_every=2, drop_mode=mode)
    assert http.get(f"{sim.base_url}/stats").status_code == 200
    with pytest.raises(exc):
        http.get(f"{sim.base_url}/stats").json()
    assert http.get(f"{sim.base_url}/stats").status_code == 200
    assert sim.stats()["faults"]["drop"] == 1


def test_slow_pages(sim: CSimulator, http: requests.Session) -> None:
    sim.set_faults(rate_limit=None, slow_every=1, slow_seconds=0.3)
    t0 = time.perf_counter()
    assert http.get(f"{sim.base_url}/files").status_code == 200
    assert time.perf_counter() - t0 >= 0.3
    assert sim.stats()["faults"]["slow"] == 1


def test_forced_snapshot_expiry_and_restart_from_the_last_modified(sim: CSimulator, http: requests.Session) -> None:
    url = f"{sim.base_url}/files"
    want = list(sim.live_records("files"))
    sim.set_faults(rate_limit=None, expire_every=1, expire_after_pages=2)
    got: list[dict[str, Any]] = []
    r = http.get(url, params={"page_size": 10})
    restarts = 0
    while True:
        if r.status_code == 410:
            assert r.json()["error"]["code"] == "snapshot_expired"
            restarts += 1
            # As C's README says: restart the window from the last modified applied, inclusive.
            r = http.get(url, params={"page_size": 10, "modified_from": got[-1]["modified"]})
            continue
        assert r.status_code == 200
        got.extend(r.json())
        nxt = r.links.get("next")
        if nxt is None:
            break
        r = http.get(nxt["url"])
    assert restarts >= 2 and sim.stats()["faults"]["expire"] == restarts
    dedup = {rec["uuid"]: rec for rec in got}
    assert len(got) > len(want) and sorted(dedup.values(), key=order_key) == want  # seen again, never skipped


def test_max_faults_caps_injection(sim: CSimulator, http: requests.Session) -> None:
    sim.set_faults(rate_limit=None, internal_every=1, max_faults=2)
    assert [http.get(f"{sim.base_url}/stats").status_code for _ in range(4)] == [500, 500, 200, 200]


def test_rate_limit_is_on_by_default_and_429s_do_not_count(http: requests.Session) -> None:
    with CSimulator(manual(**SMALL), token=TOKEN) as s:
        assert s.faults.rate_limit == 10
        url = f"{s.base_url}/stats"
        burst = [http.get(url) for _ in range(14)]
        codes = [r.status_code for r in burst]
        assert codes[:10] == [200] * 10 and 429 in codes[10:]
        limited = next(r for r in burst if r.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limited" and is_imf(limited.headers["Retry-After"])
        wait = parsedate_to_datetime(limited.headers["Retry-After"]) - parsedate_to_datetime(limited.headers["Date"])
        assert 1 <= wait.total_seconds() <= 2  # judged by Date (the simulator's manual clock), not wall time
        assert s.stats()["faults"]["rate_limit"] == codes.count(429)
        time.sleep(1.05)
        # The 429s did not count: a full second's worth is allowed again at once.
        assert [http.get(url).status_code for _ in range(10)] == [200] * 10
        stats = s.stats()
        assert stats["peak_requests_per_second"] == 10 and sum(stats["requests_per_second"].values()) == 20
        # A valid token without read is answered 403 even when over the limit; 401 too.
        assert http.get(url).status_code == 429
        assert requests.get(url, timeout=5).status_code == 401


# ---------------------------------------------------------------------- admin API, CLI, files


def test_admin_api_drives_everything(sim: CSimulator, http: requests.Session) -> None:
    admin = CSimAdminClient(sim.base_url, TOKEN)
    assert admin.advance(60).startswith("2026-11-03T00:01:00")
    tree = admin.add_participant_tree(visits=1, acquisitions=1, files=2)
    assert sim.get("participants", tree["participant"]) is not None and len(tree["files"]) == 2
    f0, f1 = tree["files"]
    assert admin.update("files", f0, index=99)["index"] == 99
    assert admin.delete("files", f0)["uuid"] == f0
    assert admin.get("files", f0) is None and admin.restore("files", f0)["uuid"] == f0
    assert admin.make_invalid("files", f1, "bad_key")["object"] != sim.repair("files", f1)["object"]
    assert admin.defects("files") == {}
    assert admin.move_file(f1)["object"]["bucket"] in BUCKETS
    q = admin.uuid("participants", 0)
    assert admin.merge_participants(tree["participant"], q)["moved"] == tree["visits"]
    assert admin.move("files", f0, sim.uuid("acquisitions", 1))["acquisition"] == sim.uuid("acquisitions", 1)
    assert sum(admin.mutate_fraction(0.1, seed=1)["updated"].values()) > 0
    assert admin.file_bytes(f0) == sim.file_bytes(f0)
    assert dict(admin.iter_files()) == dict(sim.iter_files())
    nxt = http.get(f"{sim.base_url}/files", params={"page_size": 5}).links["next"]["url"]
    assert admin.expire_snapshots() >= 1 and http.get(nxt).status_code == 410
    admin.set_faults(rate_limit=None, internal_every=1)
    assert http.get(f"{sim.base_url}/stats").status_code == 500
    assert admin.stats()["faults"]["internal"] == 1 and admin.config()["faults"]["internal_every"] == 1
    admin.set_faults(rate_limit=None)
    assert http.get(f"{sim.base_url}/stats").status_code == 200
    admin.reset()
    assert sim.counts()["participants"] == 12 and sim.stats()["requests"] == 0 and sim.now_ms() == BASE_MS
    assert sim.faults == NO_LIMIT
    r = http.post(f"{sim.admin_url}/mutate", json={"op": "update", "resource": "files", "uuid": "nope"})
    assert r.status_code == 404
    assert http.post(f"{sim.admin_url}/mutate", json={"op": "explode"}).status_code == 400
    no_read = requests.post(f"{sim.admin_url}/stats", headers={"Authorization": f"Bearer {NO_READ}"}, timeout=5)
    assert no_read.status_code == 403
    assert requests.post(f"{sim.admin_url}/stats", timeout=5).status_code == 401
    assert sim.stats()["requests"] == 0  # admin requests are not API requests


def test_cli_serves_until_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CSIM_TOKEN=TOKEN, CSIM_NO_SCOPE_TOKEN=NO_READ)
    args = ["--participants", "3", "--files-per-acquisition", "2", "--seed", "4", "--no-rate-limit", "--plain"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator_c", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid and info["base_url"].endswith("/v2") and info["admin_url"].endswith("/_sim")
        stats = requests.get(f"{info['base_url']}/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert stats.json()["participants"] == 3 and stats.json()["files"] == 3 * 2 * 3 * 2
        no_read = requests.get(f"{info['base_url']}/stats", headers={"Authorization": f"Bearer {NO_READ}"}, timeout=5)
        assert no_read.status_code == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_spawn_helper_keeps_the_default_rate_limit() -> None:
    with spawn(TOKEN, "--participants", "2", "--clock", "manual") as child:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        codes = [requests.get(f"{child.base_url}/stats", headers=headers, timeout=5).status_code for _ in range(14)]
        assert 429 in codes
        assert child.admin.stats()["faults"]["rate_limit"] == codes.count(429)
        assert child.admin.config()["config"]["participants"] == 2
    assert child.proc.returncode == 0


def test_files_seed_both_buckets_of_an_s3_server(sim: CSimulator) -> None:
    sim.move_file(sim.uuid("files", 0))
    objects = dict(sim.iter_files())
    with s3_server() as endpoint:
        counts = put_objects(endpoint, objects.items())
        assert set(counts) == set(BUCKETS) and sum(counts.values()) == len(objects) == sim.counts()["files"] + 1
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(connect_timeout=5, read_timeout=10),
        )
        for rec in list(sim.live_records("files"))[:10]:
            body = s3.get_object(Bucket=rec["object"]["bucket"], Key=rec["object"]["key"])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == rec["sha256"] and len(body) == rec["bytes"]


def test_stop_start_is_an_outage_on_the_same_url(http: requests.Session) -> None:
    s = CSimulator(manual(participants=2), token=TOKEN, faults=NO_LIMIT).start()
    try:
        url = f"{s.base_url}/stats"
        assert http.get(url).status_code == 200
        s.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            http.get(url, timeout=2)
        s.start()
        assert s.base_url + "/stats" == url and http.get(url).status_code == 200
    finally:
        s.stop()


# ---------------------------------------------------------------------- scale


def test_fifty_thousand_files_page_in_small_memory() -> None:
    cfg = SimConfig(participants=1250, visits_per_participant=2, acquisitions_per_visit=4, files_per_acquisition=5)
    assert cfg.total_files == 50_000
    tracemalloc.start()
    try:
        t0 = time.process_time()  # CPU time: other load on the machine must not fail the test
        cat = Catalogue(cfg)
        start_cpu = time.process_time() - t0
        for i in range(0, 50_000, 500):
            cat.update("files", cat.uuid("files", i), index=i)
        snap = cat.pin("files", None, None)
        pages = [cat.page(snap, page, 500) for page in (1, 2, 3, 57, 100)]  # far pages: found by counting
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert start_cpu < 0.5
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    assert snap.total == 50_000 and [len(p) for p in pages] == [500] * 5 and cat.page(snap, 101, 500) == []
    keys = [order_key(r) for p in pages for r in p]
    assert keys == sorted(keys) and len({k[1] for k in keys}) == len(keys)
    assert pages[-1][-1] == list(cat.records("files", modified_from=pages[-1][-1]["modified"]))[-1]
    assert len(snap.ends) <= 64  # what a snapshot keeps while it is followed: bounded
