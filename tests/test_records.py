"""B's records -> staged rows, per ``shared/contracts/b-to-a.md`` and ``source-b/``.

The parser is the one B's config builds (``include/sources/b.yaml``: ``protocol: rest``, its ``api:``
section) with B's mapping file. Expected values come from the contracts ("Columns", "Records that cannot be stored as
they are", A's PN form in ``a-model.md``, B's timestamp rules), never from records.py.
"""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from medsync.config import get_source_config
from medsync.levels import staged_columns
from medsync.mapping import load_mapping
from medsync.sources import open_source
from medsync.sources.base import Buckets, RecordParser, RecordRejected, StagedRecord
from medsync.sources.rest.converters import absolute_key as storage_key

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "b-imaging-unit-test"
UPDATED = "2026-11-19T10:00:00+09:00"
UPDATED_AT = datetime(2026, 11, 19, 1, 0, tzinfo=UTC)

# Distinctive PHI values, so a reason that leaks one is caught.
PHI_MRN = "MRN-7788-9911"
PHI_FAMILY = "Zyxwardson"
PHI_GIVEN = "Quillonia"
PHI_BIRTH = "1961-07-23"


def b_parser(bucket: str) -> RecordParser:
    source = open_source(get_source_config("b"))
    return source.parser(load_mapping(ROOT / "include" / "mappings" / "b.yaml"), Buckets(bucket, frozenset({bucket})))


@pytest.fixture(scope="module")
def parser() -> RecordParser:
    return b_parser(BUCKET)


def patient(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "pat_01",
        "mrn": PHI_MRN,
        "name": {"family": PHI_FAMILY, "given": PHI_GIVEN},
        "gender": "FEMALE",
        "birth_date": PHI_BIRTH,
        "updated_at": UPDATED,
        "deleted": False,
    }
    raw.update(changes)
    return raw


def study(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "stu_01",
        "patient_id": "pat_01",
        "study_uid": "1.2.840.1",
        "accession_no": "ACC-1",
        "performed_at": "2026-11-18T09:30:00+09:00",
        "description": "MRI knee",
        "status": "COMPLETED",
        "updated_at": UPDATED,
        "deleted": False,
    }
    raw.update(changes)
    return raw


def series(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "ser_01",
        "study_id": "stu_01",
        "series_uid": "1.2.840.1.1",
        "number": 3,
        "modality": "MRI",
        "body_part": "KNEE_LEFT",
        "description": "T1 sagittal",
        "updated_at": UPDATED,
        "deleted": False,
    }
    raw.update(changes)
    return raw


def image(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "img_01",
        "series_uid": "1.2.840.1.1",
        "sop_uid": "1.2.840.1.1.1",
        "number": 1,
        "file_path": "/2026/11/19/stu_8f2/ser_01/img_0001.dcm",
        "file_size": 524_288,
        "content_type": "application/dicom",
        "updated_at": UPDATED,
        "deleted": False,
    }
    raw.update(changes)
    return raw


RECORD = {"subject": patient, "study": study, "sequence": series, "instance": image}


def value(rec: StagedRecord, level: str, column: str) -> Any:
    return rec.values[staged_columns(level).index(column)]


def rejected(parser: RecordParser, level: str, raw: Any) -> RecordRejected:
    with pytest.raises(RecordRejected) as caught:
        parser.parse(level, raw)
    return caught.value


# --- good records ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(RECORD))
def test_a_good_live_record_is_staged(parser: RecordParser, level: str) -> None:
    rec = parser.parse(level, RECORD[level]())
    assert rec.source_key == RECORD[level]()["id"]
    assert rec.updated_at == UPDATED_AT
    assert rec.deleted is False
    assert len(rec.values) == len(staged_columns(level))


# --- required fields: missing or empty -> held back, reason names the field ----------------------------

REQUIRED = [
    ("subject", "mrn"),
    ("study", "study_uid"),
    ("study", "status"),
    ("study", "patient_id"),
    ("sequence", "series_uid"),
    ("sequence", "modality"),
    ("sequence", "study_id"),
    ("instance", "sop_uid"),
    ("instance", "series_uid"),
    ("instance", "file_path"),
]


@pytest.mark.parametrize("how", ["missing", "empty", "null"])
@pytest.mark.parametrize(("level", "field"), REQUIRED)
def test_required_field_missing_or_empty_is_held_back_naming_the_field(
    parser: RecordParser, level: str, field: str, how: str
) -> None:
    raw = RECORD[level]()
    if how == "missing":
        del raw[field]
    else:
        raw[field] = "" if how == "empty" else None
    problem = rejected(parser, level, raw)
    assert field in problem.reason
    assert problem.source_key == raw["id"]
    assert problem.updated_at == UPDATED_AT


def test_required_field_that_is_only_nul_is_empty_once_stored_and_held_back(parser: RecordParser) -> None:
    problem = rejected(parser, "subject", patient(mrn="\x00"))
    assert "mrn" in problem.reason


@pytest.mark.parametrize(
    ("level", "field"),
    [("subject", "gender"), ("study", "accession_no"), ("sequence", "body_part"), ("instance", "file_size")],
)
def test_optional_field_may_be_null(parser: RecordParser, level: str, field: str) -> None:
    assert parser.parse(level, RECORD[level](**{field: None})).deleted is False


# --- file_path -> storage_bucket + storage_key -------------------------------------------------------------


@pytest.mark.parametrize(
    "file_path",
    [
        "2026/11/19/img.dcm",  # no leading '/'
        "img.dcm",
        "/2026//11/img.dcm",  # empty segment
        "//2026/img.dcm",
        "/2026/./img.dcm",  # '.' segment
        "/./img.dcm",
        "/2026/../img.dcm",  # '..' segment
        "/../etc/passwd",
        "/2026/11/",  # trailing '/' is an empty segment
        "/",
        "/2026/..",
    ],
)
def test_file_path_that_is_not_an_absolute_key_is_held_back(parser: RecordParser, file_path: str) -> None:
    problem = rejected(parser, "instance", image(file_path=file_path))
    assert "file_path" in problem.reason
    assert problem.source_key == "img_01"


def test_good_file_path_becomes_the_key_without_its_leading_slash_in_the_sources_bucket(
    parser: RecordParser,
) -> None:
    rec = parser.parse("instance", image(file_path="/2026/11/19/stu_8f2/ser_01/img_0001.dcm"))
    assert value(rec, "instance", "storage_key") == "2026/11/19/stu_8f2/ser_01/img_0001.dcm"
    assert value(rec, "instance", "storage_bucket") == BUCKET


def test_bucket_comes_from_the_parser_not_the_record() -> None:
    other = b_parser("another-bucket")
    rec = other.parse("instance", image(bucket="evil-bucket", storage_bucket="evil-bucket"))
    assert value(rec, "instance", "storage_bucket") == "another-bucket"


@pytest.mark.parametrize(
    ("file_path", "key"),
    [
        ("/a.dcm", "a.dcm"),
        ("/2026/.hidden/img..dcm", "2026/.hidden/img..dcm"),  # dots inside a name are not '.' segments
        ("/2026/...", "2026/..."),
        ("/x y/é/img 1.dcm", "x y/é/img 1.dcm"),
    ],
)
def test_storage_key_keeps_everything_after_the_leading_slash(file_path: str, key: str) -> None:
    assert storage_key(file_path) == key


# --- unknown enum values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "field", "bad"),
    [
        ("subject", "gender", "NONBINARY"),
        ("study", "status", "SCHEDULED"),
        ("sequence", "modality", "MRI_3T"),
        ("sequence", "body_part", "ELBOW_LEFT"),
        ("sequence", "body_part", "knee_left"),
    ],
)
def test_unknown_enum_value_is_held_back_naming_the_field(
    parser: RecordParser, level: str, field: str, bad: str
) -> None:
    problem = rejected(parser, level, RECORD[level](**{field: bad}))
    assert field in problem.reason
    assert problem.source_key == RECORD[level]()["id"]


# --- reasons never carry PHI ---------------------------------------------------------------------------------

PHI = (PHI_MRN, PHI_FAMILY, PHI_GIVEN, PHI_BIRTH, "7788", "1961")


@pytest.mark.parametrize(
    "changes",
    [
        {"gender": "NONBINARY"},
        {"birth_date": "1961-07-32"},
        {"birth_date": "23/07/1961"},
        {"birth_date": 19610723},
        {"mrn": 77889911},
        {"mrn": [PHI_MRN]},
        {"name": f"{PHI_FAMILY} {PHI_GIVEN}"},
        {"name": {"family": [PHI_FAMILY], "given": PHI_GIVEN}},
        {"name": {"family": PHI_FAMILY, "given": 1961}},
        {"updated_at": f"{PHI_BIRTH} {PHI_FAMILY}"},
        {"deleted": PHI_FAMILY},
    ],
    ids=lambda c: next(iter(c)),
)
def test_reason_never_contains_phi_even_when_phi_fields_are_bad(parser: RecordParser, changes: dict[str, Any]) -> None:
    problem = rejected(parser, "subject", patient(**changes))
    for text in (problem.reason, str(problem), repr(problem.args)):
        for phi in PHI:
            assert phi not in text, f"{phi!r} leaked into {text!r}"
    assert next(iter(changes)) in problem.reason


# --- wrong types ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "field", "bad"),
    [
        ("sequence", "number", "3"),
        ("sequence", "number", 3.0),
        ("sequence", "number", True),
        ("instance", "number", "1"),
        ("instance", "file_size", 1.5),
        ("instance", "file_size", "524288"),
        ("subject", "mrn", 12345),
        ("subject", "name", "Kim Ji"),
        ("subject", "deleted", "false"),
        ("study", "deleted", 0),
        ("study", "study_uid", 1.2),
        ("study", "description", ["a"]),
        ("sequence", "modality", 1),
        ("instance", "content_type", {"type": "dicom"}),
        ("instance", "id", 17),
    ],
)
def test_wrong_type_is_held_back_naming_the_field(parser: RecordParser, level: str, field: str, bad: Any) -> None:
    problem = rejected(parser, level, RECORD[level](**{field: bad}))
    assert field in problem.reason


@pytest.mark.parametrize("raw", [None, [], "a record", 42])
def test_something_that_is_not_an_object_is_held_back(parser: RecordParser, raw: Any) -> None:
    problem = rejected(parser, "subject", raw)
    assert problem.source_key


# --- dates and times -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1980-02-30", "1980/02/03", "03-02-1980", "19800203", "yesterday", "", "1980-2-3"])
def test_birth_date_that_does_not_parse_is_held_back(parser: RecordParser, bad: str) -> None:
    assert "birth_date" in rejected(parser, "subject", patient(birth_date=bad)).reason


def test_birth_date_in_iso_week_form_is_not_a_date_and_is_held_back(parser: RecordParser) -> None:
    assert "birth_date" in rejected(parser, "subject", patient(birth_date="1980-W05-4")).reason


def test_birth_date_parses_to_a_date(parser: RecordParser) -> None:
    assert value(parser.parse("subject", patient()), "subject", "birth_date") == date(1961, 7, 23)


@pytest.mark.parametrize(
    "bad",
    [
        "2026-11-18T09:30:00",  # no offset
        "2026-11-18T09:30:00.123456",  # no offset
        "2026-11-18",  # a date is not a date-time
        "2026-13-18T09:30:00Z",
        "2026-11-18T25:30:00Z",
        "last tuesday",
        "",
        1763425800,
    ],
)
def test_performed_at_that_does_not_parse_or_has_no_offset_is_held_back(parser: RecordParser, bad: Any) -> None:
    assert "performed_at" in rejected(parser, "study", study(performed_at=bad)).reason


SAME_INSTANT = [
    "2026-11-19T01:02:03Z",
    "2026-11-19T01:02:03z",
    "2026-11-19T10:02:03+09:00",
    "2026-11-18T20:02:03-05:00",
    "2026-11-19T01:02:03.000000Z",
    "2026-11-19T10:02:03.0+09:00",
    "2026-11-18T20:02:03.000-05:00",
]


@pytest.mark.parametrize("text", SAME_INSTANT)
def test_updated_at_with_any_offset_and_fraction_parses_to_the_same_instant(parser: RecordParser, text: str) -> None:
    rec = parser.parse("subject", patient(updated_at=text))
    assert rec.updated_at == datetime(2026, 11, 19, 1, 2, 3, tzinfo=UTC)
    assert rec.updated_at.utcoffset() is not None


@pytest.mark.parametrize(
    "text", ["2026-11-19T01:02:03.123456Z", "2026-11-19T10:02:03.123456+09:00", "2026-11-18T20:02:03.123456-05:00"]
)
def test_fractional_seconds_are_kept_to_the_microsecond(parser: RecordParser, text: str) -> None:
    rec = parser.parse("study", study(updated_at=text, performed_at=text))
    expected = datetime(2026, 11, 19, 1, 2, 3, 123456, tzinfo=UTC)
    assert rec.updated_at == expected
    assert value(rec, "study", "study_at") == expected


def test_two_versions_compare_as_instants_not_as_text(parser: RecordParser) -> None:
    earlier = parser.parse("subject", patient(updated_at="2026-11-19T09:59:59+09:00"))  # 00:59:59Z
    later = parser.parse("subject", patient(updated_at="2026-11-19T01:00:00Z"))
    assert earlier.updated_at < later.updated_at
    assert later.updated_at - earlier.updated_at == timedelta(seconds=1)


@pytest.mark.parametrize("bad", ["2026-11-19T10:00:00", "2026-11-19", "soon", "", None, 1763514000])
def test_bad_updated_at_is_held_back_with_the_given_key(parser: RecordParser, bad: Any) -> None:
    problem = rejected(parser, "study", study(updated_at=bad))
    assert "updated_at" in problem.reason
    assert problem.source_key == "stu_01"
    assert problem.updated_at is None


# --- tombstones and records without a usable id -----------------------------------------------------------------


@pytest.mark.parametrize("level", list(RECORD))
def test_tombstone_with_only_id_updated_at_and_deleted_is_accepted(parser: RecordParser, level: str) -> None:
    rec = parser.parse(level, {"id": "gone_1", "updated_at": "2026-11-19T03:00:00-05:00", "deleted": True})
    assert rec.deleted is True
    assert rec.source_key == "gone_1"
    assert rec.updated_at == datetime(2026, 11, 19, 8, 0, tzinfo=UTC)
    assert all(v is None for v in rec.values)


@pytest.mark.parametrize("level", list(RECORD))
def test_tombstone_with_every_other_field_null_is_accepted(parser: RecordParser, level: str) -> None:
    raw = {field: None for field in RECORD[level]()} | {"id": "gone_2", "updated_at": UPDATED, "deleted": True}
    rec = parser.parse(level, raw)
    assert (rec.deleted, rec.source_key, rec.updated_at) == (True, "gone_2", UPDATED_AT)


def test_deleted_false_comes_back_as_a_live_record(parser: RecordParser) -> None:
    assert parser.parse("study", study(deleted=False)).deleted is False


@pytest.mark.parametrize("missing_id", [{"drop": True}, {"id": ""}, {"id": None}, {"id": 7}])
def test_record_without_usable_id_is_held_back_with_a_stable_synthetic_key(
    parser: RecordParser, missing_id: dict[str, Any]
) -> None:
    raw = study()
    if missing_id.get("drop"):
        del raw["id"]
    else:
        raw["id"] = missing_id["id"]
    first = rejected(parser, "study", raw)
    again = rejected(parser, "study", copy.deepcopy(raw))
    other = rejected(parser, "study", {**raw, "study_uid": "1.2.840.999"})
    assert "id" in first.reason
    assert first.source_key
    assert first.source_key == again.source_key
    assert first.source_key != other.source_key
    assert first.updated_at == UPDATED_AT


def test_record_without_id_and_with_bad_updated_at_still_gets_a_key(parser: RecordParser) -> None:
    problem = rejected(parser, "subject", {"updated_at": "nope", "deleted": False})
    assert problem.source_key
    assert problem.updated_at is None


def test_record_without_deleted_flag_is_held_back(parser: RecordParser) -> None:
    raw = study()
    del raw["deleted"]
    assert "deleted" in rejected(parser, "study", raw).reason


# --- text: NUL removed, everything else exactly as sent ------------------------------------------------------

AWKWARD = "tab\there\nnew line\r\nback\\slash \"double\" 'single' 한국어 Ünïcødé 🙂 %s {} $1 ; -- "


def test_nul_is_removed_from_text(parser: RecordParser) -> None:
    rec = parser.parse("study", study(description="a\x00b\x00", accession_no="\x00ACC", study_uid="1.2\x00.3"))
    assert value(rec, "study", "description") == "ab"
    assert value(rec, "study", "accession_number") == "ACC"
    assert value(rec, "study", "study_uid") == "1.2.3"


def test_nul_is_removed_from_mrn_and_name(parser: RecordParser) -> None:
    rec = parser.parse("subject", patient(mrn="M\x00RN", name={"family": "K\x00im", "given": "J\x00i"}))
    assert value(rec, "subject", "patient_code") == "MRN"
    assert value(rec, "subject", "patient_name") == "Kim^Ji"


@pytest.mark.parametrize(
    ("level", "field", "column"),
    [
        ("study", "description", "description"),
        ("study", "accession_no", "accession_number"),
        ("sequence", "description", "description"),
        ("instance", "content_type", "content_type"),
        ("subject", "mrn", "patient_code"),
    ],
)
def test_every_other_character_is_kept_exactly(parser: RecordParser, level: str, field: str, column: str) -> None:
    rec = parser.parse(level, RECORD[level](**{field: AWKWARD}))
    assert value(rec, level, column) == AWKWARD


def test_ten_thousand_character_text_is_kept_exactly(parser: RecordParser) -> None:
    long_text = ("x\ty\\z'\"é" * 1250)[:10_000]
    assert len(long_text) == 10_000
    rec = parser.parse("sequence", series(description=long_text))
    assert value(rec, "sequence", "description") == long_text


def test_leading_and_trailing_spaces_are_kept(parser: RecordParser) -> None:
    rec = parser.parse("study", study(description="  padded  "))
    assert value(rec, "study", "description") == "  padded  "


# --- patient_name in DICOM PN form (a-model.md) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ({"family": "Kim", "given": "Ji-woo"}, "Kim^Ji-woo"),
        ({"family": "Kim", "given": None}, "Kim"),
        ({"family": "Kim"}, "Kim"),
        ({"family": None, "given": "Ji-woo"}, "^Ji-woo"),
        ({"given": "Ji-woo"}, "^Ji-woo"),
        ({"family": None, "given": None}, None),
        ({}, None),
        (None, None),
        ({"family": "", "given": "Ji-woo"}, "^Ji-woo"),
        ({"family": "Kim", "given": ""}, "Kim"),
        ({"family": "", "given": ""}, None),
        ({"family": "O^Brien", "given": "Mary=Ann"}, "O Brien^Mary Ann"),
        ({"family": "A^B=C", "given": None}, "A B C"),
        ({"family": None, "given": "x^y"}, "^x y"),
        ({"family": "홍", "given": "길동"}, "홍^길동"),
        ({"family": "van der Berg", "given": "Jan Piet"}, "van der Berg^Jan Piet"),
    ],
)
def test_patient_name_in_pn_form(parser: RecordParser, name: dict[str, Any] | None, expected: str | None) -> None:
    raw = patient(name=name)
    assert value(parser.parse("subject", raw), "subject", "patient_name") == expected


def test_patient_without_name_field_has_null_name(parser: RecordParser) -> None:
    raw = patient()
    del raw["name"]
    assert value(parser.parse("subject", raw), "subject", "patient_name") is None


# --- staged values land at their column's index -------------------------------------------------------------------


DISTINCT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # level: (B record changes, expected A column -> value), per b-to-a.md "Columns"
    "subject": (
        {"mrn": "v-mrn", "name": {"family": "v-fam", "given": "v-giv"}, "gender": "OTHER", "birth_date": "2001-02-03"},
        {"patient_code": "v-mrn", "patient_name": "v-fam^v-giv", "sex": "O", "birth_date": date(2001, 2, 3)},
    ),
    "study": (
        {
            "patient_id": "v-pat",
            "study_uid": "v-uid",
            "accession_no": "v-acc",
            "performed_at": "2001-02-03T04:05:06Z",
            "description": "v-desc",
            "status": "ORDERED",
        },
        {
            "parent_key": "v-pat",
            "study_uid": "v-uid",
            "accession_number": "v-acc",
            "study_at": datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC),
            "description": "v-desc",
            "status": "REQUESTED",
        },
    ),
    "sequence": (
        {
            "study_id": "v-stu",
            "series_uid": "v-ser",
            "number": 41,
            "modality": "ULTRASOUND",
            "body_part": "BREAST_BOTH",
            "description": "v-desc",
        },
        {
            "parent_key": "v-stu",
            "series_uid": "v-ser",
            "series_number": 41,
            "modality": "US",
            "body_part": "BREAST",
            "laterality": "B",
            "description": "v-desc",
        },
    ),
    "instance": (
        {
            "series_uid": "v-ser",
            "sop_uid": "v-sop",
            "number": 42,
            "file_path": "/v/key.dcm",
            "file_size": 43,
            "content_type": "v/type",
        },
        {
            "parent_key": "v-ser",
            "sop_instance_uid": "v-sop",
            "instance_number": 42,
            "storage_bucket": BUCKET,
            "storage_key": "v/key.dcm",
            "size_bytes": 43,
            "content_type": "v/type",
        },
    ),
}


@pytest.mark.parametrize("level", list(RECORD))
def test_staged_values_are_in_staged_columns_order(parser: RecordParser, level: str) -> None:
    changes, expected = DISTINCT[level]
    rec = parser.parse(level, RECORD[level](**changes))
    columns = staged_columns(level)
    assert set(columns) == set(expected)
    assert len(rec.values) == len(columns)
    assert dict(zip(columns, rec.values, strict=True)) == expected


@pytest.mark.parametrize(("level", "number_field"), [("sequence", "number"), ("instance", "number")])
def test_number_out_of_integer_range_is_held_back(parser: RecordParser, level: str, number_field: str) -> None:
    assert number_field in rejected(parser, level, RECORD[level](**{number_field: 2**31})).reason


def test_negative_file_size_is_held_back(parser: RecordParser) -> None:
    assert "file_size" in rejected(parser, "instance", image(file_size=-1)).reason
