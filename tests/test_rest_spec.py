"""The ``api:`` section of protocol ``rest`` (medsync.sources.rest.spec): B's and C's sections
validate, and every mistake is refused with the key path it is at."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from medsync.config import LEVELS, get_source_config
from medsync.errors import ConfigError
from medsync.sources import open_source, validate_api
from medsync.sources.base import DeletionMode, ParentLink
from medsync.sources.rest.spec import (
    CONVERTERS,
    CursorPaging,
    FeedDeletions,
    FlagDeletions,
    LastRecordPaging,
    LinkHeaderPaging,
    RestApi,
    join_path,
    path_keys,
)
from tests.rest_examples import b_api, c_api

WHERE = "include/sources/c.yaml"


def refused(section: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_api("rest", section, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: api")
    return message


# --- the acceptance examples ------------------------------------------------------------------------


def test_bs_section_validates_and_reads_like_the_contract() -> None:
    api = validate_api("rest", b_api(), "include/sources/b.yaml")
    assert isinstance(api, RestApi)
    assert isinstance(api.paging, CursorPaging) and api.paging.cursor_path == "next_cursor"
    assert isinstance(api.deletions, FlagDeletions)
    assert api.level_records_path("instance") == "data"
    assert api.level_params("study") == {"include_deleted": "true"}
    assert api.levels["instance"].parent is not None and api.levels["instance"].parent.by == "series_uid"
    assert api.levels["subject"].parent is None
    assert list(api.levels) == ["subject", "study", "sequence", "instance"]
    fields = api.levels["subject"].fields
    assert "patient_code" in fields and "sex" not in fields  # sex comes through the mapping
    assert fields["patient_name"].convert == "pn_parts" and fields["patient_name"].family == "name.family"
    assert dict(fields.items()).keys() == set(fields.keys())
    assert api.counts is not None and api.counts.paths["instance"] == "images"


def test_bs_whole_config_opens_as_a_rest_source() -> None:
    cfg = get_source_config("b")
    source = open_source(cfg)
    assert source.protocol == "rest"
    assert source.parent_link("instance") == ParentLink("series_uid")
    assert source.parent_link("study") == ParentLink()
    assert source.deletion_mode("study") == DeletionMode.INLINE
    assert source.has_counts and source.max_page_size == 1000


def test_cs_whole_config_opens_as_a_rest_source() -> None:
    source = open_source(get_source_config("c"))
    assert source.parent_link("instance") == ParentLink()  # by the acquisition's uuid
    assert source.deletion_mode("subject") == DeletionMode.FEED
    assert source.has_counts and source.max_page_size == 500


def test_cs_section_validates_and_reads_like_the_contract() -> None:
    api = validate_api("rest", c_api(), WHERE)
    assert isinstance(api, RestApi)
    assert isinstance(api.paging, LinkHeaderPaging) and api.paging.page_size_param == "page_size"
    assert api.limits.max_page_size == 500
    assert api.level_records_path("subject") is None  # the body is the array
    feed = api.deletions
    assert isinstance(feed, FeedDeletions) and feed.resources["instance"] == "files"
    assert api.feed_records_path() is None
    assert api.expired is not None and (api.expired.status, api.expired.code) == (410, "snapshot_expired")
    assert api.key.format == "uuid" and api.version.format == "epoch_millis"


def test_the_python_escape_and_the_documented_converters() -> None:
    section = c_api()
    section["levels"]["subject"]["fields"]["patient_name"]["convert"] = "python: medsync.site.c_names:display_to_pn"
    api = validate_api("rest", section, WHERE)
    field = api.levels["subject"].fields["patient_name"]
    assert field.python == "medsync.site.c_names:display_to_pn"
    assert api.levels["subject"].fields["birth_date"].python is None
    assert {"rfc3339", "pn_comma", "relative_key", "allowed_bucket", "config_bucket"} <= CONVERTERS


def test_the_spec_imports_nothing_heavy() -> None:
    # It is imported while DAG files are parsed.
    code = (
        "import sys, medsync.sources.rest.spec as s; "
        "heavy = [m for m in ('requests', 'urllib3', 'tenacity', 'airflow', 'psycopg', 'boto3') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, cwd="plugins"
    )
    assert out.stdout.strip() == "[]"


# --- unknown keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(pagination={}), "api.pagination: Extra inputs are not permitted"),
        (lambda s: s["paging"].update(cursor="x"), "api.paging.cursor: Extra inputs are not permitted"),
        (lambda s: s["auth"].update(header="X"), "api.auth.header: Extra inputs are not permitted"),
        (
            lambda s: s["levels"].update(patients={"endpoint": "/p"}),
            "api.levels.patients: Extra inputs are not permitted",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"].update(bucket={"path": "object.bucket"}),
            "api.levels.instance.fields.bucket: Extra inputs are not permitted",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["storage_key"].update(strip=True),
            "api.levels.instance.fields.storage_key.strip: Extra inputs are not permitted",
        ),
        (
            lambda s: s["deletions"]["key"].update(kind="uuid"),
            "api.deletions.key.kind: Extra inputs are not permitted",
        ),
        (lambda s: s["paging"].update(type="graphql"), "api.paging: Input tag 'graphql' found using 'type'"),
    ],
)
def test_unknown_keys_are_refused_with_their_path(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    section = c_api()
    mutate(section)
    assert expected in refused(section)


# --- cross-field rules ------------------------------------------------------------------------------


def _drop(mapping: dict[str, Any], key: str) -> None:
    del mapping[key]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: _drop(s["levels"], "sequence"), "api.levels.sequence: Field required"),
        (
            lambda s: s["levels"]["subject"].update(parent={"path": "x"}),
            "api.levels.subject.parent: subject is the top level: it has no parent",
        ),
        (
            lambda s: _drop(s["levels"]["study"], "parent"),
            "api.levels.study.parent: a study must say how it names its subject",
        ),
        (
            lambda s: s["levels"]["instance"]["parent"].update(by="study_uid"),
            "api.levels.instance.parent: by: 'study_uid' is neither source_key nor a column of sequence",
        ),
        (
            # A column of another level: study_uid is a study's.
            lambda s: s["levels"]["instance"]["fields"].update(study_uid={"path": "x"}),
            "api.levels.instance.fields.study_uid: Extra inputs are not permitted",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["size_bytes"].update(type="string", minimum=None),
            "api.levels.instance.fields.size_bytes: type string does not fit the column's bigint; "
            "use type: integer or convert: int_string",
        ),
        (
            lambda s: s["levels"]["study"]["fields"]["description"].update(type="integer"),
            "api.levels.study.fields.description: type integer does not fit the column's text",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["storage_key"].update(convert="strip_slash"),
            "api.levels.instance.fields.storage_key.convert: unknown converter 'strip_slash'",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["storage_key"].update(convert="python: not a path"),
            "api.levels.instance.fields.storage_key.convert: unknown converter",
        ),
        (
            lambda s: s["levels"]["subject"]["fields"].update(
                patient_name={"convert": "pn_parts", "family": "name.family"}
            ),
            "api.levels.subject.fields.patient_name: pn_parts needs both family and given paths",
        ),
        (
            lambda s: s["levels"]["subject"]["fields"]["patient_name"].update(family="name.family"),
            "api.levels.subject.fields.patient_name: family and given are for convert: pn_parts only",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["storage_bucket"].update(convert="config_bucket"),
            "api.levels.instance.fields.storage_bucket: config_bucket reads nothing from the record",
        ),
        (
            lambda s: s["levels"]["study"]["fields"]["study_at"].update(path=None),
            "api.levels.study.fields.study_at: path is required by rfc3339",
        ),
        (
            lambda s: s["levels"]["sequence"]["fields"]["series_number"].update(type="integer"),
            "api.levels.sequence.fields.series_number: type is the raw value's type without a converter",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["content_type"].update(minimum=0),
            "api.levels.instance.fields.content_type: minimum is for type: integer",
        ),
        (
            lambda s: _drop(s["deletions"]["resources"], "sequence"),
            "api.deletions.resources: resources must name exactly subject, study, sequence, instance: missing sequence",
        ),
        (
            lambda s: s["deletions"]["resources"].update(sequence="files"),
            "api.deletions.resources: two levels name the same resource",
        ),
        (
            lambda s: s["counts"]["paths"].update(series="x"),
            "api.counts.paths: paths must name exactly subject, study, sequence, instance: unknown 'series'",
        ),
        (lambda s: _drop(s["expired"], "code_path"), "api.expired: code_path and code go together"),
        (
            lambda s: s["limits"].update(retry_statuses=[401, 503]),
            "api.limits.retry_statuses: only 4xx/5xx statuses other than 401/403 (or 5xx) can be retried",
        ),
        (
            lambda s: s.update(paging={"type": "cursor", "cursor_param": "c", "cursor_path": "next"}),
            "api: paging cursor reads the body, so the records are in it: records_path is needed "
            "(none for subject, study, sequence, instance)",
        ),
        (lambda s: s["levels"]["study"].update(endpoint="visits"), "api.levels.study.endpoint"),
    ],
)
def test_cross_field_rules(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    section = c_api()
    mutate(section)
    assert expected in refused(section)


def test_retry_statuses_default_to_429_and_every_5xx() -> None:
    api = validate_api("rest", b_api(), WHERE)
    assert isinstance(api, RestApi)
    assert api.limits.retried == frozenset({429, *range(500, 600)})
    section = b_api()
    section["limits"]["retry_statuses"] = [429, 503, 409]
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and api.limits.retried == frozenset({429, 503, 409})


def test_a_level_may_override_the_records_path() -> None:
    section = b_api()
    section["levels"]["instance"]["records_path"] = "items"
    api = validate_api("rest", section, WHERE)
    assert api.level_records_path("instance") == "items"
    assert api.level_records_path("study") == "data"
    section["levels"]["instance"]["records_path"] = None  # the body itself: a cursor cannot be read then
    assert "records_path is needed (none for instance)" in refused(section)


def test_locations_are_the_yamls_key_paths_without_pydantics_union_labels() -> None:
    # pydantic's own location would read api.paging.link_header.cursor, api.deletions.feed,
    # api.limits.retry_statuses.0.int: none of them is a key of the YAML.
    section = c_api()
    section["paging"]["cursor"] = "x"
    section["deletions"]["resources"]["sequence"] = "files"
    section["limits"]["retry_statuses"] = ["teapot"]
    message = refused(section)
    assert "api.paging.cursor: Extra inputs" in message
    assert "api.deletions.resources: two levels" in message
    assert "api.limits.retry_statuses.0: " in message
    for label in ("link_header", "deletions.feed", ".int", "literal"):
        assert label not in message
    section = c_api()
    section["expired"] = {"status": 410, "code": "x"}  # a model-level rule: no key of its own
    assert "api.expired: code_path and code go together" in refused(section)
    section = c_api()
    section["paging"] = {"type": "cursor", "cursor_param": "c"}  # a key the YAML lacks is named
    assert "api.paging.cursor_path: Field required" in refused(section)


def test_retry_after_is_not_a_key_both_forms_are_always_read() -> None:
    section = c_api()
    section["limits"]["retry_after"] = "http_date"
    assert "api.limits.retry_after: Extra inputs are not permitted" in refused(section)


def test_every_problem_is_reported_at_once() -> None:
    section = c_api()
    section["levels"]["study"]["fields"]["bogus"] = {"path": "x"}
    section["levels"]["instance"]["fields"]["storage_key"]["convert"] = "nope"
    message = refused(section)
    assert "api.levels.study.fields.bogus" in message and "api.levels.instance.fields.storage_key.convert" in message


# --- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("data", ("data",)),
        ("error.code", ("error", "code")),
        (r"@odata\.nextLink", ("@odata.nextLink",)),
        (r"value.@odata\.etag", ("value", "@odata.etag")),
        (r"a\\b.c", ("a\\b", "c")),
        (r"a\\.b", ("a\\", "b")),
    ],
)
def test_a_dot_inside_a_key_is_escaped_with_a_backslash(path: str, keys: tuple[str, ...]) -> None:
    assert path_keys(path) == keys
    assert join_path(keys) == path
    section = c_api()
    section["levels"]["study"]["fields"]["description"]["path"] = path
    validate_api("rest", section, WHERE)


@pytest.mark.parametrize("path", ["a..b", ".a", "a.", r"a\b", "a\\", "a b", ""])
def test_a_malformed_path_is_refused(path: str) -> None:
    section = c_api()
    section["levels"]["study"]["fields"]["description"]["path"] = path
    assert "api.levels.study.fields.description.path: String should match pattern" in refused(section)


# --- per-level settings, order, windows, the paging of other API styles -----------------------------


def test_a_level_may_override_key_version_window_and_order() -> None:
    section = c_api()
    section["levels"]["study"].update(
        key={"path": "ref"},
        version={"path": "changed"},
        window={"since_param": "changed_since"},
        order="unsorted",
    )
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi)
    assert (api.level_key("study").path, api.level_version("study").path) == ("ref", "changed")
    assert api.level_window("study").since_param == "changed_since" and not api.level_window("study").sends("until")
    assert (api.level_order("study"), api.level_order("subject")) == ("unsorted", "version_ascending")
    assert api.level_key("subject").path == "uuid" and api.level_window("subject").sends("until")
    assert api.feed().order == "version_ascending" and api.feed_window() == api.window


def test_a_key_that_names_a_patient_is_declared_so_and_the_source_says_it() -> None:
    # B's and C's keys are their own ids; a REST source keyed by MRN declares it, level by level.
    assert not any(open_source(get_source_config(name)).keys_identify_patients(level)
                   for name in ("b", "c") for level in LEVELS)  # fmt: skip
    section = b_api()
    section["levels"]["subject"]["key"] = {"path": "mrn", "identifies_patient": True}
    cfg = get_source_config("b").model_copy(update={"api": section})
    source = open_source(cfg)
    assert [level for level in LEVELS if source.keys_identify_patients(level)] == ["subject"]
    assert "identifies_patient" in refused({**b_api(), "key": {"path": "id", "identifies_patient": "maybe"}})


def test_key_version_and_window_may_be_given_per_level_only() -> None:
    section = c_api()
    for what in ("key", "version", "window"):
        value = section.pop(what)
        for level in section["levels"].values():
            level[what] = value
    section["deletions"]["window"] = {"since_param": "deleted_from", "until_param": "deleted_to"}
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and api.key is None and api.level_key("instance").format == "uuid"
    assert api.feed_window().since_param == "deleted_from"
    del section["levels"]["study"]["version"]
    del section["levels"]["sequence"]["version"]
    assert "api: version is needed here or in every level (not in study, sequence)" in refused(section)
    section = c_api()
    del section["window"]
    for level in section["levels"].values():
        level["window"] = {"since_param": "from"}
    assert "api: deletions: the feed needs its own window when the section has none" in refused(section)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"until_param": "to"}, "api.window: the lower bound is sent nowhere"),
        ({"templates": {"$filter": "Modified lt {until}"}}, "api.window: the lower bound is sent nowhere"),
        ({"templates": {"$filter": "Modified ge {since"}}, "api.window.templates: $filter: "),
        ({"templates": {"$filter": "Modified ge {start}"}}, "only {since} and {until} can be filled in, got {start}"),
        ({"templates": {"$filter": "Modified ge {since!r}"}}, "only {since} and {until} can be filled in"),
        ({"templates": {"$filter": "Modified ge {since:%Y}"}}, "only {since} and {until} can be filled in"),
        ({"templates": {"$filter": "Kind eq 'x'"}}, "names neither {since} nor {until}; a fixed parameter goes"),
    ],
)
def test_a_window_must_send_its_lower_bound_and_templates_fill_in_only_the_bounds(
    window: dict[str, Any], expected: str
) -> None:
    section = c_api()
    section["window"] = window
    assert expected in refused(section)


def test_a_window_template_may_carry_both_bounds_or_the_lower_one_only() -> None:
    section = c_api()
    section["window"] = {"templates": {"$filter": "Modified ge {since} and Modified lt {until}"}}
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and api.window is not None
    assert api.window.sends("since") and api.window.sends("until")
    section["window"] = {"templates": {"q": "updated:>={since}"}, "until_param": None}
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and api.window is not None and not api.window.sends("until")


def test_last_record_paging_reads_the_body() -> None:
    section = c_api()
    section["paging"] = {"type": "last_record", "cursor_param": "starting_after", "has_more_path": "has_more"}
    assert "paging last_record reads the body, so the records are in it" in refused(section)
    section["records_path"] = "data"
    section["deletions"]["records_path"] = "data"
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and isinstance(api.paging, LastRecordPaging) and api.paging.cursor_path is None


def test_order_and_absent_keys_are_explicit_options() -> None:
    section = c_api()
    section["order"] = "descending"
    assert "api.order: Input should be 'version_ascending' or 'unsorted'" in refused(section)
    section = c_api()
    section["paging"] = {"type": "next_link", "next_path": "links.next", "absent_on_last_page": True}
    section["records_path"] = "data"
    section["empty_page_omits_records"] = True
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and api.empty_page_omits_records and api.feed_omits_records()
    section["deletions"]["empty_page_omits_records"] = False
    api = validate_api("rest", section, WHERE)
    assert isinstance(api, RestApi) and not api.feed_omits_records()
    assert validate_api("rest", b_api(), WHERE).order == "version_ascending"  # type: ignore[attr-defined]


# --- A's NOT NULL columns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda s: _drop(s["levels"]["instance"]["fields"], "storage_key"),
            "api.levels.instance.fields: storage_key is NOT NULL in A's imaging.instance: a field must make it, "
            "with required: true",
        ),
        (
            lambda s: [_drop(s["levels"]["instance"]["fields"], c) for c in ("storage_key", "sop_instance_uid")],
            "api.levels.instance.fields: sop_instance_uid, storage_key are NOT NULL in A's imaging.instance",
        ),
        (
            lambda s: _drop(s["levels"]["subject"], "fields"),
            "api.levels.subject.fields: patient_code is NOT NULL in A's imaging.subject",
        ),
        (
            lambda s: s["levels"]["instance"]["fields"]["storage_key"].update(required=False),
            "api.levels.instance.fields.storage_key: storage_key is NOT NULL in A's imaging.instance: "
            "the field needs required: true",
        ),
        (
            lambda s: _drop(s["levels"]["study"]["fields"]["study_uid"], "required"),
            "api.levels.study.fields.study_uid: study_uid is NOT NULL in A's imaging.study",
        ),
        (
            lambda s: s["levels"]["sequence"]["parent"].update(required=False),
            "api.levels.sequence.parent: A's imaging.sequence.study_id is NOT NULL: the parent needs required: true",
        ),
    ],
)
def test_as_not_null_columns_need_a_required_field(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    section = c_api()
    mutate(section)
    assert expected in refused(section)


def test_vocabulary_columns_are_left_to_the_mapping_and_config_bucket_is_never_null() -> None:
    section = b_api()
    assert "status" not in section["levels"]["study"]["fields"]  # NOT NULL, fed by the mapping file
    assert section["levels"]["instance"]["fields"]["storage_bucket"] == {"convert": "config_bucket"}
    validate_api("rest", section, WHERE)


# --- a converter's output must fit the column ------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "column", "field", "expected"),
    [
        (
            "study",
            "study_at",
            {"path": "started", "convert": "dicom_da"},
            "api.levels.study.fields.study_at: convert: dicom_da makes a date, which the column's timestamp with "
            "time zone does not store (converters making a timestamp: epoch_millis, epoch_seconds, rfc3339)",
        ),
        (
            "instance",
            "size_bytes",
            {"path": "bytes", "convert": "rfc3339"},
            "api.levels.instance.fields.size_bytes: convert: rfc3339 makes a timestamp, which the column's bigint "
            "does not store (converters making an integer: int_string)",
        ),
        (
            "subject",
            "birth_date",
            {"path": "dob", "convert": "int_string"},
            "convert: int_string makes an integer, which the column's date does not store",
        ),
        (
            "instance",
            "content_type",
            {"path": "mime", "convert": "epoch_millis"},
            "convert: epoch_millis makes a timestamp, which the column's text does not store (converters making "
            "text: absolute_key, allowed_bucket, config_bucket, pn_comma, pn_parts, relative_key, uuid_text)",
        ),
        (
            "subject",
            "birth_date",
            {"path": "dob"},
            "api.levels.subject.fields.birth_date: type string does not fit the column's date; use a converter "
            "(dicom_da, iso_date) or python:",
        ),
        (
            "study",
            "study_at",
            {"path": "started", "type": "integer"},
            "type integer does not fit the column's timestamp with time zone; use a converter",
        ),
        ("study", "description", {"path": "label", "type": "boolean"}, "type boolean does not fit the column's text"),
    ],
)
def test_a_converter_or_type_the_column_does_not_store_is_refused(
    level: str, column: str, field: dict[str, Any], expected: str
) -> None:
    section = c_api()
    section["levels"][level]["fields"][column] = field
    assert expected in refused(section)


def test_a_python_converter_is_not_judged_at_load_time() -> None:
    # Its output is checked per record instead (test_rest_records).
    section = c_api()
    section["levels"]["study"]["fields"]["study_at"] = {"path": "started", "convert": "python: x.y:z"}
    validate_api("rest", section, WHERE)


def test_an_integer_key_or_reference_has_no_uuid_format() -> None:
    section = c_api()
    section["key"]["type"] = "integer"
    assert "api.key: format: uuid is for a string key" in refused(section)
    section = c_api()
    section["levels"]["study"]["parent"]["type"] = "integer"
    assert "api.levels.study.parent: format: uuid is for a string reference" in refused(section)
