"""C's records -> staged rows through the REST parser C's config builds (``include/sources/c.yaml``).

One case per rule of ``shared/contracts/c-to-a.md``: "Columns", "Names, numbers and dates",
"Records that cannot be stored as they are", and the deletion feed ("Deletions"). Expected values
come from the contract, never from the parser's code.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from medsync.config import get_source_config
from medsync.levels import staged_columns
from medsync.mapping import load_mapping
from medsync.sources import open_source
from medsync.sources.base import Buckets, DeletionMode, ParentLink, RawPage, RecordParser, RecordRejected, StagedRecord

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = Buckets("c-archive-eu-1", frozenset({"c-archive-eu-1", "c-archive-eu-2"}))
MODIFIED = 1793666537381
MODIFIED_AT = datetime(2026, 11, 3, 0, 42, 17, 381000, tzinfo=UTC)  # c-to-a.md "Columns"

P_UUID = "1a1b1111-2222-4333-8444-55555555ecde"
V_UUID = "2b2c2222-3333-4444-8555-66666666fabc"
A_UUID = "3c3d3333-4444-4555-8666-77777777abcd"
F_UUID = "260088bd-fad9-493b-a062-8b83443b76fe"

PHI_MRN = "MRN-5566-7788"
PHI_NAME = "Zyxwardson, Quillonia"
PHI_DOB = "19610723"


@pytest.fixture(scope="module")
def parser() -> RecordParser:
    cfg = get_source_config("c")
    return open_source(cfg).parser(load_mapping(ROOT / "include" / "mappings" / "c.yaml"), BUCKETS)


def participant(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "uuid": P_UUID,
        "modified": MODIFIED,
        "identifiers": {"mrn": PHI_MRN, "other": ["X-1"]},
        "display_name": PHI_NAME,
        "sex": "f",
        "dob": PHI_DOB,
    }
    return raw | changes


def visit(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "uuid": V_UUID,
        "modified": MODIFIED,
        "participant": P_UUID,
        "study_instance_uid": "1.2.392.1",
        "accession": "ACC-9",
        "started": "2026-11-03T09:15:00+09:00",
        "label": "brain MRI",
        "state": "complete",
    }
    return raw | changes


def acquisition(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "uuid": A_UUID,
        "modified": MODIFIED,
        "visit": V_UUID,
        "series_instance_uid": "1.2.392.1.1",
        "series_no": "007",
        "modality": "mr",
        "anatomy": "knee",
        "side": "left",
        "notes": "T1",
    }
    return raw | changes


def file(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "uuid": F_UUID,
        "modified": MODIFIED,
        "acquisition": A_UUID,
        "sop_instance_uid": "1.2.392.1.1.17",
        "index": 17,
        "object": {"bucket": "c-archive-eu-2", "key": "v2/2026/11/03/febbb0c7/3/0017.dcm"},
        "bytes": 524288,
        "mime": "application/dicom",
        "sha256": "ab" * 32,
    }
    return raw | changes


RECORD = {"subject": participant, "study": visit, "sequence": acquisition, "instance": file}


def values(rec: StagedRecord, level: str) -> dict[str, Any]:
    return dict(zip(staged_columns(level), rec.values, strict=True))


def rejected(parser: RecordParser, level: str, raw: Any) -> RecordRejected:
    with pytest.raises(RecordRejected) as caught:
        parser.parse(level, raw)
    (from_page,) = parser.parse_page(level, RawPage([raw]))
    assert isinstance(from_page, RecordRejected)
    assert (from_page.reason, from_page.source_key) == (caught.value.reason, caught.value.source_key)
    return caught.value


def staged(parser: RecordParser, level: str, raw: Any) -> StagedRecord:
    rec = parser.parse(level, raw)
    assert list(parser.parse_page(level, RawPage([raw]))) == [rec]
    return rec


# --- the source as C's config says -------------------------------------------------------------------


def test_c_is_a_feed_source_linked_by_uuid_with_counts() -> None:
    source = open_source(get_source_config("c"))
    assert all(source.deletion_mode(level) is DeletionMode.FEED for level in RECORD)
    assert all(source.parent_link(level) == ParentLink("source_key") for level in ("study", "sequence", "instance"))
    assert source.has_counts
    assert source.max_page_size == 500


# --- "Columns" -----------------------------------------------------------------------------------------

EXPECTED: dict[str, dict[str, Any]] = {
    "subject": {
        "patient_code": PHI_MRN,
        "patient_name": "Zyxwardson^Quillonia",
        "sex": "F",
        "birth_date": date(1961, 7, 23),
    },
    "study": {
        "parent_key": P_UUID,
        "study_uid": "1.2.392.1",
        "accession_number": "ACC-9",
        "study_at": datetime(2026, 11, 3, 0, 15, tzinfo=UTC),
        "description": "brain MRI",
        "status": "COMPLETED",
    },
    "sequence": {
        "parent_key": V_UUID,
        "series_uid": "1.2.392.1.1",
        "series_number": 7,
        "modality": "MR",
        "body_part": "KNEE",
        "laterality": "L",
        "description": "T1",
    },
    "instance": {
        "parent_key": A_UUID,
        "sop_instance_uid": "1.2.392.1.1.17",
        "instance_number": 17,
        "storage_bucket": "c-archive-eu-2",
        "storage_key": "v2/2026/11/03/febbb0c7/3/0017.dcm",
        "size_bytes": 524288,
        "content_type": "application/dicom",
    },
}


@pytest.mark.parametrize("level", list(RECORD))
def test_a_good_record_is_staged_column_by_column(parser: RecordParser, level: str) -> None:
    rec = staged(parser, level, RECORD[level]())
    assert (rec.source_key, rec.updated_at, rec.deleted) == (RECORD[level]()["uuid"], MODIFIED_AT, False)
    assert values(rec, level) == EXPECTED[level]


def test_modified_is_exact_to_the_millisecond(parser: RecordParser) -> None:
    assert staged(parser, "subject", participant(modified=1793665800000)).updated_at == datetime(
        2026, 11, 3, 0, 30, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sex": "m"}, "M"),
        ({"sex": "x"}, "O"),
        ({"sex": "u"}, None),
        ({"sex": None}, None),
    ],
)
def test_sex_by_the_values_table(parser: RecordParser, changes: dict[str, Any], expected: str | None) -> None:
    assert values(staged(parser, "subject", participant(**changes)), "subject")["sex"] == expected


@pytest.mark.parametrize(
    ("anatomy", "side", "body_part", "laterality"),
    [
        ("knee", None, "KNEE", None),
        (None, "right", None, "R"),
        (None, None, None, None),
        ("breast", "bilateral", "BREAST", "B"),
    ],
)
def test_anatomy_and_side_each_on_its_own(
    parser: RecordParser, anatomy: str | None, side: str | None, body_part: str | None, laterality: str | None
) -> None:
    got = values(staged(parser, "sequence", acquisition(anatomy=anatomy, side=side)), "sequence")
    assert (got["body_part"], got["laterality"]) == (body_part, laterality)


def test_optional_fields_may_be_null(parser: RecordParser) -> None:
    got = values(staged(parser, "instance", file(index=None, bytes=None, mime=None)), "instance")
    assert (got["instance_number"], got["size_bytes"], got["content_type"]) == (None, None, None)
    got = values(staged(parser, "sequence", acquisition(series_no=None, notes=None)), "sequence")
    assert (got["series_number"], got["description"]) == (None, None)
    got = values(staged(parser, "subject", participant(dob=None, display_name=None)), "subject")
    assert (got["birth_date"], got["patient_name"]) == (None, None)
    assert values(staged(parser, "study", visit(started=None)), "study")["study_at"] is None


# --- "Names, numbers and dates" --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("display_name", "patient_name"),
    [
        ("Tanaka, Yui", "Tanaka^Yui"),
        ("  Tanaka ,Yui ", "Tanaka^Yui"),
        ("Tanaka", "Tanaka"),
        ("Tanaka,", "Tanaka"),
        ("Tanaka, ", "Tanaka"),
        (", Yui", "^Yui"),
        (",Yui", "^Yui"),
        ("de la Cruz, Ana María", "de la Cruz^Ana María"),
        ("Smith, John, Jr.", "Smith^John, Jr."),
        ("O^Neil, Mary=Ann", "O Neil^Mary Ann"),
        ("", None),
        ("   ", None),
        (",", None),
        (" , ", None),
        (None, None),
    ],
)
def test_display_name_to_patient_name_is_stored_never_held_back(
    parser: RecordParser, display_name: str | None, patient_name: str | None
) -> None:
    rec = staged(parser, "subject", participant(display_name=display_name))
    assert values(rec, "subject")["patient_name"] == patient_name


@pytest.mark.parametrize(("series_no", "number"), [("3", 3), ("007", 7), ("-1", -1)])
def test_series_no_integer_strings(parser: RecordParser, series_no: str, number: int) -> None:
    assert values(staged(parser, "sequence", acquisition(series_no=series_no)), "sequence")["series_number"] == number


@pytest.mark.parametrize("series_no", ["", " 3", "3.0", "3a", "99999999999"])
def test_series_no_that_is_not_an_integer_string_is_held_back(parser: RecordParser, series_no: str) -> None:
    problem = rejected(parser, "sequence", acquisition(series_no=series_no))
    assert "series_no" in problem.reason
    assert (problem.source_key, problem.updated_at) == (A_UUID, MODIFIED_AT)


def test_dob_parses_as_a_dicom_da(parser: RecordParser) -> None:
    assert values(staged(parser, "subject", participant(dob="19840617")), "subject")["birth_date"] == date(1984, 6, 17)


@pytest.mark.parametrize("dob", ["19840230", "1984-06-17", "198406", ""])
def test_dob_that_does_not_parse_is_held_back(parser: RecordParser, dob: str) -> None:
    assert "dob" in rejected(parser, "subject", participant(dob=dob)).reason


def test_started_without_an_offset_is_held_back(parser: RecordParser) -> None:
    assert "started" in rejected(parser, "study", visit(started="2026-11-03T09:15:00")).reason


# --- "Records that cannot be stored as they are" ----------------------------------------------------------

REQUIRED = [
    ("subject", "uuid"),
    ("subject", "modified"),
    ("study", "uuid"),
    ("sequence", "modified"),
    ("instance", "uuid"),
    ("subject", "identifiers.mrn"),
    ("study", "study_instance_uid"),
    ("study", "state"),
    ("study", "participant"),
    ("sequence", "series_instance_uid"),
    ("sequence", "modality"),
    ("sequence", "visit"),
    ("instance", "sop_instance_uid"),
    ("instance", "acquisition"),
    ("instance", "object.bucket"),
    ("instance", "object.key"),
]


def _set(raw: dict[str, Any], path: str, how: str) -> dict[str, Any]:
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node[part] = dict(node[part])
        node = node[part]
    if how == "missing":
        del node[last]
    else:
        node[last] = None if how == "null" else ""
    return raw


@pytest.mark.parametrize(
    ("level", "path", "how"),
    # an empty `modified` is a string, which is the wrong type (below), not an empty value
    [(lv, p, how) for lv, p in REQUIRED for how in ("missing", "null", "empty") if (p, how) != ("modified", "empty")],
)
def test_required_field_missing_null_or_empty_is_held_back(
    parser: RecordParser, level: str, path: str, how: str
) -> None:
    problem = rejected(parser, level, _set(RECORD[level](), path, how))
    assert path in problem.reason


def test_required_text_that_is_only_nul_is_empty(parser: RecordParser) -> None:
    assert "identifiers.mrn" in rejected(parser, "subject", participant(identifiers={"mrn": "\x00"})).reason


@pytest.mark.parametrize("key", ["", "/v2/a.dcm", "a//b.dcm", "a/b/", "a/./b.dcm", "a/../b.dcm", ".", ".."])
def test_object_key_that_is_not_a_relative_key_is_held_back(parser: RecordParser, key: str) -> None:
    problem = rejected(parser, "instance", file(object={"bucket": "c-archive-eu-1", "key": key}))
    assert "object.key" in problem.reason
    assert problem.source_key == F_UUID


@pytest.mark.parametrize("bucket", ["c-archive-eu-3", "C-ARCHIVE-EU-1", "c-archive-eu-1 ", "b-imaging-dev"])
def test_object_bucket_not_allowed_for_c_is_held_back(parser: RecordParser, bucket: str) -> None:
    problem = rejected(parser, "instance", file(object={"bucket": bucket, "key": "a/b.dcm"}))
    assert "object.bucket" in problem.reason


def test_the_configured_bucket_is_allowed_too(parser: RecordParser) -> None:
    rec = staged(parser, "instance", file(object={"bucket": "c-archive-eu-1", "key": "a/b.dcm"}))
    assert values(rec, "instance")["storage_bucket"] == "c-archive-eu-1"


@pytest.mark.parametrize(
    ("level", "field", "code"),
    [
        ("subject", "sex", "M"),
        ("study", "state", "scheduled"),
        ("sequence", "modality", "MR"),
        ("sequence", "anatomy", "elbow"),
        ("sequence", "side", "Left"),
    ],
)
def test_unknown_code_is_held_back_naming_the_field(parser: RecordParser, level: str, field: str, code: str) -> None:
    problem = rejected(parser, level, RECORD[level](**{field: code}))
    assert f"{field}: unknown value" in problem.reason
    assert problem.source_key == RECORD[level]()["uuid"]


@pytest.mark.parametrize(
    ("level", "field", "bad"),
    [
        ("sequence", "series_no", 3),
        ("instance", "index", "17"),
        ("instance", "bytes", "524288"),
        ("instance", "bytes", 1.5),
        ("subject", "modified", str(MODIFIED)),
        ("subject", "modified", ""),
        ("subject", "identifiers", "MRN-1"),
        ("instance", "object", "c-archive-eu-1/a.dcm"),
        ("subject", "uuid", P_UUID.upper()),
        ("subject", "uuid", "not-a-uuid"),
        ("study", "participant", P_UUID.upper()),
        ("sequence", "visit", "1.2.3"),
        ("instance", "acquisition", "1.2.392.1.1"),
        ("study", "label", 7),
    ],
)
def test_wrong_type_is_held_back_naming_the_field(parser: RecordParser, level: str, field: str, bad: Any) -> None:
    assert field in rejected(parser, level, RECORD[level](**{field: bad})).reason


@pytest.mark.parametrize(("field", "bad"), [("index", 2**31), ("index", -(2**31) - 1), ("bytes", 2**63)])
def test_number_that_does_not_fit_its_a_column_is_held_back(parser: RecordParser, field: str, bad: int) -> None:
    assert field in rejected(parser, "instance", file(**{field: bad})).reason


@pytest.mark.parametrize(("field", "edge"), [("index", 2**31 - 1), ("index", -(2**31)), ("bytes", 2**63 - 1)])
def test_number_at_the_edge_of_its_a_column_is_stored(parser: RecordParser, field: str, edge: int) -> None:
    column = {"index": "instance_number", "bytes": "size_bytes"}[field]
    assert values(staged(parser, "instance", file(**{field: edge})), "instance")[column] == edge


def test_an_empty_mrn_of_a_participant_without_a_hospital_record_is_held_back(parser: RecordParser) -> None:
    assert "identifiers.mrn" in rejected(parser, "subject", participant(identifiers={"mrn": "", "other": []})).reason


AWKWARD = "tab\there\nnew line\r\nback\\slash \"double\" 'single' 한국어 🙂 %s {} ; -- "


def test_nul_removed_and_every_other_character_kept(parser: RecordParser) -> None:
    rec = staged(parser, "study", visit(label=AWKWARD, accession="A\x00CC", study_instance_uid="1.2\x00.3"))
    got = values(rec, "study")
    assert (got["description"], got["accession_number"], got["study_uid"]) == (AWKWARD, "ACC", "1.2.3")


def test_unknown_fields_are_ignored(parser: RecordParser) -> None:
    assert values(staged(parser, "instance", file(new_field={"x": 1})), "instance") == EXPECTED["instance"]


PHI = (PHI_MRN, "Zyxwardson", "Quillonia", PHI_DOB, "5566", "1961")


@pytest.mark.parametrize(
    "changes",
    [
        {"dob": "1961-07-23"},
        {"dob": 19610723},
        {"identifiers": {"mrn": 55667788}},
        {"identifiers": PHI_MRN},
        {"display_name": ["Zyxwardson", "Quillonia"]},
        {"modified": "Zyxwardson 1961"},
        {"uuid": "Zyxwardson-1961"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_reason_never_contains_phi(parser: RecordParser, changes: dict[str, Any]) -> None:
    problem = rejected(parser, "subject", participant(**changes))
    for text in (problem.reason, str(problem), repr(problem.args)):
        for phi in PHI:
            assert phi not in text, f"{phi!r} leaked into {text!r}"
    assert next(iter(changes)) in problem.reason


# --- "Deletions": the feed's items of a level are tombstones ----------------------------------------------

FEED_RESOURCE = {"subject": "participants", "study": "visits", "sequence": "acquisitions", "instance": "files"}


@pytest.mark.parametrize("level", list(FEED_RESOURCE))
def test_a_deletion_item_is_a_tombstone_at_its_deleted_time(parser: RecordParser, level: str) -> None:
    item = {"resource": FEED_RESOURCE[level], "uuid": F_UUID, "deleted": 1793667108207}
    (rec,) = parser.parse_page(level, RawPage([item], deletions=True))
    assert rec == StagedRecord(F_UUID, datetime(2026, 11, 3, 0, 51, 48, 207000, tzinfo=UTC), True, ())


@pytest.mark.parametrize(
    "item",
    [
        {"resource": "files", "uuid": "NOT-A-UUID", "deleted": 1793667108207},
        {"resource": "files", "uuid": F_UUID, "deleted": "1793667108207"},
        {"resource": "files", "uuid": F_UUID},
        {"resource": "visits", "uuid": F_UUID, "deleted": 1793667108207},  # another level's item
        "files",
    ],
)
def test_a_bad_deletion_item_is_held_back_and_recognised_again_on_retry(parser: RecordParser, item: Any) -> None:
    (problem,) = parser.parse_page("instance", RawPage([item], deletions=True))
    assert isinstance(problem, RecordRejected)
    assert problem.reason.startswith("deletion item")
    assert problem.payload is not None and problem.payload != item
    with pytest.raises(RecordRejected) as again:
        parser.parse("instance", problem.payload)
    assert (again.value.reason, again.value.source_key) == (problem.reason, problem.source_key)


def test_a_good_deletion_item_from_quarantine_is_a_tombstone(parser: RecordParser) -> None:
    bad = {"resource": "files", "uuid": F_UUID, "deleted": "soon"}
    (problem,) = parser.parse_page("instance", RawPage([bad], deletions=True))
    assert isinstance(problem, RecordRejected) and isinstance(problem.payload, dict)
    fixed = {key: {**value, "deleted": 1793667108207} for key, value in problem.payload.items()}
    assert parser.parse("instance", fixed).deleted is True
