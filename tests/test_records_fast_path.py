"""The REST parser's fast path (compiled closures) gives exactly what its explaining path gives.

``RestRecordParser`` stages a record through per-column closures over plain dict lookups and,
whenever one of them refuses, parses it again along the explaining path (envelope, shape,
required, vocabulary, checks), the only one that makes reasons. ``parse_page`` (a page) and
``parse`` (a quarantined record) share both. These tests hold the fast path to the explaining
path's results, and ``parse_page`` to ``parse``, record for record, over the simulator's
awkward, invalid and deleted records, with the parser B's config builds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from medsync.config import get_source_config
from medsync.mapping import load_mapping
from medsync.sources import open_source
from medsync.sources.base import Buckets, RawPage, RecordRejected, StagedRecord
from medsync.sources.rest.records import RestRecordParser
from simulator.config import SimConfig
from simulator.model import Catalogue

LEVELS = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}


@pytest.fixture(scope="module")
def parser() -> RestRecordParser:
    cfg = get_source_config("b")
    built = open_source(cfg).parser(load_mapping(cfg.mapping_path), Buckets("b-bucket", frozenset({"b-bucket"})))
    assert isinstance(built, RestRecordParser)
    return built


def explained(parser: RestRecordParser) -> Any:
    """The explaining path alone (no fast path), as ``parse``'s signature."""
    return lambda level, raw: parser._levels[level].explained(raw)


def page_outcomes(parser: RestRecordParser, level: str, items: list[Any]) -> list[Any]:
    return [
        (r.reason, r.source_key, r.updated_at) if isinstance(r, RecordRejected) else r
        for r in parser.parse_page(level, RawPage(items))
    ]


def outcome(parse: Any, level: str, raw: object) -> StagedRecord | tuple[str, str, Any]:
    try:
        return parse(level, raw)
    except RecordRejected as rejected:
        return (rejected.reason, rejected.source_key, rejected.updated_at)


def catalogue_records(tombstone_style: str) -> list[tuple[str, Any]]:
    cat = Catalogue(
        SimConfig(
            seed=3, patients=40, studies_per_patient=2, series_per_study=2, images_per_series=3, clock="manual",
            invalid_fraction=0.15, unknown_enum_fraction=0.1, awkward_text_fraction=0.3, nul_fraction=0.05,
            null_fraction=0.2, long_text_fraction=0.02, tombstone_style=tombstone_style,
        )
    )  # fmt: skip
    cat.advance(60)
    cat.mutate_fraction(0.2, seed=1)
    out = []
    for level, resource in LEVELS.items():
        after = None
        while True:
            page, after = cat.page(resource, include_deleted=True, limit=500, after=after)
            out += [(level, json.loads(json.dumps(r))) for r in page]  # as it crosses the wire
            if after is None:
                break
    return out


@pytest.mark.parametrize("tombstone_style", ["absent", "null"])
def test_fast_path_matches_step_by_step_on_simulated_records(parser: RestRecordParser, tombstone_style: str) -> None:
    records = catalogue_records(tombstone_style)
    kinds = {"staged": 0, "tombstone": 0, "rejected": 0}
    for level, raw in records:
        fast = outcome(parser.parse, level, raw)
        assert fast == outcome(explained(parser), level, raw), (level, raw)
        kinds["rejected" if isinstance(fast, tuple) else "tombstone" if fast.deleted else "staged"] += 1
    assert all(kinds.values()), kinds  # every path was exercised
    for level in LEVELS:
        items = [raw for lvl, raw in records if lvl == level]
        assert page_outcomes(parser, level, items) == [outcome(parser.parse, level, raw) for raw in items]


GOOD = {
    "id": "img_1", "updated_at": "2026-11-19T01:00:00Z", "deleted": False, "series_uid": "1.2.3", "sop_uid": "1.2.3.4",
    "number": 1, "file_path": "/a/b.dcm", "file_size": 10, "content_type": "application/dicom",
}  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"number": True},
        {"number": 1.0},
        {"number": "1"},
        {"file_size": 2**63},
        {"number": 2**31},
        {"id": "x" * 65},
        {"id": ""},
        {"id": "\x00"},
        {"updated_at": "2026-11-19 01:00:00"},
        {"updated_at": "2026-W47-3T01:00:00Z"},
        {"deleted": "false"},
        {"deleted": True, "number": "garbage"},
        {"deleted": True, "updated_at": "nonsense"},
        {"sop_uid": "\ud800"},
        {"sop_uid": "\x00"},
        {"file_path": "relative.dcm"},
        {"file_path": "/a//b.dcm"},
        {"file_path": "/a/../b.dcm"},
        {"content_type": 7},
        {"series_uid": None},
    ],
)
def test_fast_path_matches_step_by_step_on_edge_cases(parser: RestRecordParser, changes: dict[str, Any]) -> None:
    raw = {**GOOD, **changes}
    assert outcome(parser.parse, "instance", raw) == outcome(explained(parser), "instance", raw)
    assert page_outcomes(parser, "instance", [raw]) == [outcome(parser.parse, "instance", raw)]


@pytest.mark.parametrize("raw", [None, [], "text", 3])
def test_non_objects_are_rejected_alike(parser: RestRecordParser, raw: object) -> None:
    assert outcome(parser.parse, "subject", raw) == outcome(explained(parser), "subject", raw)
    assert page_outcomes(parser, "subject", [raw]) == [outcome(parser.parse, "subject", raw)]
