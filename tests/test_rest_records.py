"""The rest parser's generic rules, on variations of B's ``api:`` section (``include/sources/b.yaml``).

B's and C's own records are tested in ``test_records.py`` and ``test_rest_records_c.py``; this file
covers what a spec may say that neither config uses, and the checks made when the parser is built
(a mapping that does not fit the spec is a ``MappingError`` before any record is read).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsync.errors import ConfigError, MappingError
from medsync.mapping import Mapping, load_mapping, parse_mapping
from medsync.sources.base import Buckets, RawPage, RecordRejected, StagedRecord
from medsync.sources.rest.records import RestRecordParser
from medsync.sources.rest.spec import RestApi

ROOT = Path(__file__).resolve().parents[1]
B_API: dict[str, Any] = yaml.safe_load((ROOT / "include" / "sources" / "b.yaml").read_text(encoding="utf-8"))["api"]
B_MAPPING_RAW: dict[str, Any] = yaml.safe_load((ROOT / "include" / "mappings" / "b.yaml").read_text(encoding="utf-8"))
BUCKETS = Buckets("bucket-1", frozenset({"bucket-1"}))
UPDATED = "2026-11-19T01:00:00Z"


def api(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(B_API)
    raw.update(changes)
    return raw


def build(raw_api: dict[str, Any], mapping: Mapping | None = None) -> RestRecordParser:
    return RestRecordParser(
        RestApi.model_validate(raw_api), mapping or load_mapping(ROOT / "include" / "mappings" / "b.yaml"), BUCKETS
    )


def series(**changes: Any) -> dict[str, Any]:
    raw = {"id": "ser_1", "updated_at": UPDATED, "deleted": False, "study_id": "stu_1", "series_uid": "1.2",
           "number": 3, "modality": "MRI", "body_part": None, "description": "d"}  # fmt: skip
    return raw | changes


def outcome(parser: RestRecordParser, level: str, raw: object) -> StagedRecord | RecordRejected:
    (result,) = parser.parse_page(level, RawPage([raw]))
    try:
        again: StagedRecord | RecordRejected = parser.parse(level, raw)
    except RecordRejected as rejected:
        again = rejected
    assert type(again) is type(result)
    return result


# --- the mapping must fit the spec ---------------------------------------------------------------------


def test_b_spec_and_b_mapping_build() -> None:
    assert isinstance(build(api()), RestRecordParser)


def test_a_mapping_naming_a_field_the_spec_does_not_declare_is_refused() -> None:
    raw = copy.deepcopy(B_MAPPING_RAW)
    raw["sequence"][1]["field"] = "anatomy"
    with pytest.raises(MappingError, match="anatomy"):
        build(api(), parse_mapping(raw, "mappings/x.yaml"))


def test_a_mapping_that_does_not_feed_a_mapped_column_is_refused() -> None:
    raw = copy.deepcopy(B_MAPPING_RAW)
    raw["sequence"] = raw["sequence"][:1]  # body_part and laterality fed by nothing
    with pytest.raises(MappingError, match="body_part, laterality"):
        build(api(), parse_mapping(raw, "mappings/x.yaml"))


def test_a_mapping_feeding_a_column_the_spec_makes_itself_is_refused() -> None:
    raw = copy.deepcopy(B_MAPPING_RAW)
    raw["sequence"].append({"field": "modality2", "columns": ["description"], "values": {"x": "y"}})
    spec = api()
    spec["levels"]["sequence"]["mapped"]["modality2"] = {"path": "m2"}
    with pytest.raises(MappingError, match="description"):
        build(spec, parse_mapping(raw, "mappings/x.yaml"))


def test_mapping_error_is_a_config_error() -> None:
    assert issubclass(MappingError, ConfigError)


# --- deletions as the spec says them ------------------------------------------------------------------------


def test_deleted_at_deletions_a_non_null_value_is_a_tombstone() -> None:
    spec = api(deletions={"type": "deleted_at", "path": "removed_at"}, params={})
    parser = build(spec)
    gone = outcome(parser, "sequence", {"id": "ser_1", "updated_at": UPDATED, "removed_at": "2026-11-19T01:00:00Z"})
    assert isinstance(gone, StagedRecord) and gone.deleted
    live = outcome(parser, "sequence", series(removed_at=None))
    assert isinstance(live, StagedRecord) and not live.deleted
    live = outcome(parser, "sequence", series())
    assert isinstance(live, StagedRecord) and not live.deleted


def test_no_deletions_every_record_is_live() -> None:
    parser = build(api(deletions={"type": "none"}, params={}))
    rec = outcome(parser, "sequence", series(deleted="whatever"))
    assert isinstance(rec, StagedRecord) and not rec.deleted


# --- versions and keys ---------------------------------------------------------------------------------------


def test_epoch_seconds_version() -> None:
    parser = build(api(version={"path": "ts", "format": "epoch_seconds"}))
    rec = outcome(parser, "sequence", series(ts=1793665800))
    assert isinstance(rec, StagedRecord) and rec.updated_at == datetime(2026, 11, 3, 0, 30, tzinfo=UTC)
    bad = outcome(parser, "sequence", series(ts="1793665800"))
    assert isinstance(bad, RecordRejected) and bad.reason.startswith("ts: ") and bad.updated_at is None


def test_nested_key_path_and_a_container_that_is_not_an_object() -> None:
    parser = build(api(key={"path": "meta.id"}))
    rec = outcome(parser, "sequence", series(meta={"id": "k-1"}))
    assert isinstance(rec, StagedRecord) and rec.source_key == "k-1"
    bad = outcome(parser, "sequence", series(meta="k-1"))
    assert isinstance(bad, RecordRejected) and bad.reason == "meta: Input should be a valid dictionary"
    assert bad.source_key.startswith("?sha256:")


def test_key_longer_than_max_length_is_held_back() -> None:
    parser = build(api())
    bad = outcome(parser, "sequence", series(id="x" * 65))
    assert isinstance(bad, RecordRejected) and bad.reason == "id: String should have at most 64 characters"
    assert isinstance(outcome(parser, "sequence", series(id="x" * 64)), StagedRecord)


# --- fields ----------------------------------------------------------------------------------------------------


def test_python_converter_is_called_with_the_raw_value() -> None:
    spec = api()
    spec["levels"]["sequence"]["fields"]["series_number"] = {
        "path": "number",
        "convert": "python: medsync.sources.rest.converters:int_string",
    }
    parser = build(spec)
    rec = outcome(parser, "sequence", series(number="0042"))
    assert isinstance(rec, StagedRecord) and rec.values[2] == 42
    bad = outcome(parser, "sequence", series(number="4 2"))
    assert isinstance(bad, RecordRejected) and bad.reason == "number: Value error, is not an integer string"


def test_python_converter_that_cannot_be_imported_fails_the_build() -> None:
    spec = api()
    spec["levels"]["sequence"]["fields"]["series_number"] = {"path": "number", "convert": "python: medsync.nope:f"}
    with pytest.raises(ConfigError, match=r"medsync\.nope:f"):
        build(spec)


def test_string_format_uuid_is_checked() -> None:
    spec = api()
    spec["levels"]["sequence"]["fields"]["series_uid"] = {"path": "series_uid", "format": "uuid", "required": True}
    parser = build(spec)
    bad = outcome(parser, "sequence", series(series_uid="1.2"))
    assert isinstance(bad, RecordRejected) and bad.reason == "series_uid: must be lower-case UUID text"
    good = outcome(parser, "sequence", series(series_uid="260088bd-fad9-493b-a062-8b83443b76fe"))
    assert isinstance(good, StagedRecord)


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        (2**31, "number: out of range for an integer column"),
        (-(2**31) - 1, "number: out of range for an integer column"),
        (True, "number: Input should be a valid integer"),
        (3.0, "number: Input should be a valid integer"),
    ],
)
def test_integer_column_range_and_type(number: object, reason: str) -> None:
    bad = outcome(build(api()), "sequence", series(number=number))
    assert isinstance(bad, RecordRejected) and bad.reason == reason


def test_shape_problems_are_all_listed_then_required_then_vocabulary() -> None:
    parser = build(api())
    both = outcome(parser, "sequence", series(number="3", description=7, series_uid=""))
    assert isinstance(both, RecordRejected)
    assert both.reason == "number: Input should be a valid integer; description: Input should be a valid string"
    missing = outcome(parser, "sequence", series(series_uid="", modality="", study_id=None))
    assert isinstance(missing, RecordRejected)
    assert missing.reason == "required field missing or empty: series_uid, modality, study_id"
    unknown = outcome(parser, "sequence", series(modality="MRI_3T", number=2**40))
    assert isinstance(unknown, RecordRejected)
    assert unknown.reason == "modality: unknown value 'MRI_3T' (not in the mapping file)"


def test_a_required_integer_zero_is_not_empty() -> None:
    spec = api()
    spec["levels"]["sequence"]["fields"]["series_number"] = {"path": "number", "type": "integer", "required": True}
    parser = build(spec)
    rec = outcome(parser, "sequence", series(number=0))
    assert isinstance(rec, StagedRecord) and rec.values[2] == 0
    assert isinstance(outcome(parser, "sequence", series(number=None)), RecordRejected)


def test_a_key_with_a_dot_in_it_is_read_whole_when_escaped() -> None:
    # OData-style keys ("@odata.etag"): one key, not a path of two.
    spec = api()
    spec["levels"]["sequence"]["fields"]["description"] = {"path": r"meta.@odata\.etag"}
    spec["levels"]["sequence"]["fields"]["series_number"] = {"path": r"@odata\.count", "type": "integer"}
    parser = build(spec)
    raw = series(meta={"@odata.etag": "W/1", "@odata": {"etag": "wrong"}}, **{"@odata.count": 7})
    rec = outcome(parser, "sequence", raw)
    assert isinstance(rec, StagedRecord) and rec.values[2] == 7 and rec.values[-1] == "W/1"
    bad = outcome(parser, "sequence", series(meta="flat", **{"@odata.count": 7}))
    assert isinstance(bad, RecordRejected) and bad.reason == "meta: Input should be a valid dictionary"
    bad = outcome(parser, "sequence", series(**{"@odata.count": "7"}))
    assert isinstance(bad, RecordRejected) and bad.reason == r"@odata\.count: Input should be a valid integer"


def test_a_levels_own_key_and_version_are_read_for_its_records_only() -> None:
    spec = api()
    spec["levels"]["sequence"]["key"] = {"path": "meta.ref", "max_length": 8}
    spec["levels"]["sequence"]["version"] = {"path": "meta.changed", "format": "epoch_seconds"}
    parser = build(spec)
    raw = series(meta={"ref": "ser_9", "changed": 1793664000})
    rec = outcome(parser, "sequence", raw)
    assert isinstance(rec, StagedRecord) and rec.source_key == "ser_9"
    assert rec.updated_at == datetime(2026, 11, 3, tzinfo=UTC)
    bad = outcome(parser, "sequence", series(meta={"ref": "ser_9", "changed": "2026-11-03T00:00:00Z"}))
    assert isinstance(bad, RecordRejected) and bad.reason.startswith("meta.changed: Value error")
    # Other levels keep the section's key and version.
    study = {"id": "stu_1", "updated_at": UPDATED, "deleted": False, "patient_id": "pat_1", "study_uid": "1.2",
             "status": "COMPLETED"}  # fmt: skip
    rec = outcome(parser, "study", study)
    assert isinstance(rec, StagedRecord) and rec.source_key == "stu_1"


# --- what a python: converter returns must fit A's column --------------------------------------------


@pytest.mark.parametrize(
    ("column", "function", "raw", "returned", "takes"),
    [
        ("study_at", "medsync.sources.rest.converters:int_string", "1984", "int", "an aware datetime"),
        ("study_at", "medsync.sources.rest.converters:iso_date", "1984-06-17", "date", "an aware datetime"),
        ("study_at", "tests.rest_examples:naive_time", "1984", "a naive datetime", "an aware datetime"),
        ("description", "tests.rest_examples:flag", "1984", "bool", "text"),
        ("accession_number", "medsync.sources.rest.converters:int_string", "1984", "int", "text"),
    ],
)
def test_a_python_converter_returning_the_wrong_type_holds_the_record_back(
    column: str, function: str, raw: str, returned: str, takes: str
) -> None:
    spec = api()
    spec["levels"]["study"]["fields"][column] = {"path": "raw", "convert": f"python: {function}"}
    parser = build(spec)
    study = {"id": "stu_1", "updated_at": UPDATED, "deleted": False, "patient_id": "pat_1", "study_uid": "1.2",
             "status": "COMPLETED", "raw": raw}  # fmt: skip
    bad = outcome(parser, "study", study)
    assert isinstance(bad, RecordRejected)
    pg_type = {"study_at": "timestamp with time zone"}.get(column, "text")
    assert bad.reason == (
        f"raw: Value error, python converter {function} returned {returned}, but the {column} column ({pg_type}) "
        f"takes {takes}"
    )
    assert raw not in bad.reason  # never the value


def test_a_python_converter_returning_the_right_type_is_stored_integers_in_range_text_without_nul() -> None:
    spec = api()
    fields = spec["levels"]["sequence"]["fields"]
    fields["series_number"] = {"path": "number", "convert": "python: tests.rest_examples:huge"}
    parser = build(spec)
    bad = outcome(parser, "sequence", series(number=1))
    assert isinstance(bad, RecordRejected)
    assert "returned an integer out of range, but the series_number column (integer) takes an integer" in bad.reason
    fields["series_number"] = {"path": "number", "convert": "python: medsync.sources.rest.converters:int_string"}
    fields["description"] = {"path": "description", "convert": "python: tests.rest_examples:text_with_nul"}
    parser = build(spec)
    rec = outcome(parser, "sequence", series(number="12", description="x"))
    assert isinstance(rec, StagedRecord) and rec.values[2] == 12 and rec.values[-1] == "ax"
    rec = outcome(parser, "sequence", series(number=None))
    assert isinstance(rec, StagedRecord) and rec.values[2] is None


def test_integer_keys_and_parent_references_are_stored_as_their_decimal_text() -> None:
    # Django's, Spring Data REST's and OData's numeric ids: no python: needed.
    spec = api(key={"path": "id", "type": "integer"})
    spec["levels"]["sequence"]["parent"] = {"path": "study_id", "type": "integer", "required": True}
    parser = build(spec)
    rec = outcome(parser, "sequence", series(id=42, study_id=7))
    assert isinstance(rec, StagedRecord) and rec.source_key == "42" and rec.values[0] == "7"
    for raw, reason in [
        (series(id="42", study_id=7), "id: Input should be a valid integer"),
        (series(id=True, study_id=7), "id: Input should be a valid integer"),
        (series(id=42, study_id="7"), "study_id: Value error, must be an integer (a JSON integer)"),
        (series(id=42, study_id=None), "required field missing or empty: series_uid, study_id"),
    ]:
        if reason.startswith("required"):
            raw["series_uid"] = ""
        bad = outcome(parser, "sequence", raw)
        assert isinstance(bad, RecordRejected) and bad.reason == reason, raw


def test_a_nullable_column_no_field_makes_is_stored_null() -> None:
    # A source without accession numbers or descriptions leaves them out; vocabulary and NOT NULL
    # columns must still be fed (test_a_mapping_that_does_not_feed_a_mapped_column_is_refused).
    spec = api()
    del spec["levels"]["study"]["fields"]["accession_number"]
    del spec["levels"]["study"]["fields"]["description"]
    study = {"id": "stu_1", "updated_at": UPDATED, "deleted": False, "patient_id": "pat_1", "study_uid": "1.2",
             "status": "COMPLETED", "accession_no": "A1", "description": "d"}  # fmt: skip
    rec = outcome(build(spec), "study", study)
    assert isinstance(rec, StagedRecord)
    assert rec.values == ("pat_1", "1.2", None, None, None, "COMPLETED")
