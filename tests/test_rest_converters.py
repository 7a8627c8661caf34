"""The rest protocol's converters, case by case, from the contracts' own examples.

Expected values are c-to-a.md's tables ("Names, numbers and dates", "Columns", "Records that
cannot be stored"), b-to-a.md's and a-model.md's rules (the PN form, B's ``file_path``), never
converters.py. A refused value's message must not contain the value (it becomes a reason).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from medsync.errors import ConfigError
from medsync.sources.rest import converters
from medsync.sources.rest.spec import CONVERTERS, OUTPUT_TYPES


def refused(convert: object, *values: object) -> str:
    with pytest.raises(ValueError) as caught:
        convert(*values)  # type: ignore[operator]
    message = str(caught.value)
    for value in values:
        if isinstance(value, str) and len(value) > 2:
            assert value not in message, f"the value leaked into {message!r}"
    return message


# --- c-to-a.md: display_name -> patient_name -----------------------------------------------------------

PN_COMMA = [
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
]


@pytest.mark.parametrize(("display_name", "patient_name"), PN_COMMA)
def test_pn_comma_follows_c_to_a_table(display_name: str | None, patient_name: str | None) -> None:
    assert converters.pn_comma(display_name) == patient_name


@pytest.mark.parametrize(
    ("display_name", "patient_name"),
    [
        ("\u00a0Tanaka\u3000,\u2003Yui\u2029", "Tanaka^Yui"),  # Unicode White_Space is trimmed
        ("\x1cTanaka", "\x1cTanaka"),  # U+001C is not White_Space: kept (str.strip() would drop it)
        ("TANAKA, yui", "TANAKA^yui"),  # case stays as sent
        ("Ta\x00naka, Yui", "Tanaka^Yui"),  # NUL removed
        ("Tanaka,\tYui\n", "Tanaka^Yui"),
    ],
)
def test_pn_comma_trims_white_space_only(display_name: str, patient_name: str) -> None:
    assert converters.pn_comma(display_name) == patient_name


def test_pn_comma_refuses_a_non_string() -> None:
    refused(converters.pn_comma, ["Tanaka", "Yui"])


# --- a-model.md / b-to-a.md: name.family + name.given -> patient_name ----------------------------------


@pytest.mark.parametrize(
    ("family", "given", "expected"),
    [
        ("Kim", "Ji-woo", "Kim^Ji-woo"),
        ("Kim", None, "Kim"),
        (None, "Ji-woo", "^Ji-woo"),
        (None, None, None),
        ("", "Ji-woo", "^Ji-woo"),
        ("Kim", "", "Kim"),
        ("", "", None),
        ("O^Brien", "Mary=Ann", "O Brien^Mary Ann"),
        (" Kim ", " Ji ", " Kim ^ Ji "),  # B's parts are not trimmed
        ("K\x00im", "J\x00i", "Kim^Ji"),
    ],
)
def test_pn_parts(family: str | None, given: str | None, expected: str | None) -> None:
    assert converters.pn_parts(family, given) == expected


# --- c-to-a.md: series_no -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3", 3),
        ("007", 7),
        ("-1", -1),
        ("+12", 12),
        ("2147483647", 2147483647),
        ("-2147483648", -2147483648),
        (None, None),
    ],
)
def test_int_string_parses_integer_strings(text: str | None, number: int | None) -> None:
    assert converters.int_string(text) == number


@pytest.mark.parametrize(
    "text", ["", " 3", "3 ", "3.0", "3a", "99999999999", "2147483648", "-2147483649", "+", "\u0663", "1e3"]
)
def test_int_string_refuses_what_is_not_an_integer_string(text: str) -> None:
    refused(converters.int_string, text)


@pytest.mark.parametrize("value", [3, 3.0, True])
def test_int_string_refuses_a_json_number(value: object) -> None:
    refused(converters.int_string, value)


# --- c-to-a.md: dob (DICOM DA) and b-to-a.md: birth_date (ISO) -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "day"), [("19840617", date(1984, 6, 17)), ("20000229", date(2000, 2, 29)), (None, None)]
)
def test_dicom_da_parses_real_dates(text: str | None, day: date | None) -> None:
    assert converters.dicom_da(text) == day


@pytest.mark.parametrize(
    "text", ["19840230", "1984-06-17", "198406", "", "19000229", "1984061\uff17", " 19840617", 19840617]
)
def test_dicom_da_refuses_what_is_not_eight_digits_of_a_real_date(text: object) -> None:
    refused(converters.dicom_da, text)


@pytest.mark.parametrize("text", ["1980-02-30", "1980/02/03", "19800203", "1980-2-3", "1980-W05-4", "", 19800203])
def test_iso_date_refuses_what_is_not_yyyy_mm_dd(text: object) -> None:
    refused(converters.iso_date, text)


def test_iso_date_parses() -> None:
    assert converters.iso_date("1961-07-23") == date(1961, 7, 23)
    assert converters.iso_date(None) is None


# --- times ---------------------------------------------------------------------------------------------------


def test_epoch_millis_is_exact_to_the_millisecond() -> None:
    # c-to-a.md "Columns": 1793666537381 -> 2026-11-03 00:42:17.381+00
    assert converters.epoch_millis(1793666537381) == datetime(2026, 11, 3, 0, 42, 17, 381000, tzinfo=UTC)
    # source-c/README.md: 1793665800000 is 2026-11-03T00:30:00.000Z
    assert converters.epoch_millis(1793665800000) == datetime(2026, 11, 3, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize("value", ["1793666537381", 1793666537381.0, True, None, 10**20])
def test_epoch_millis_refuses_what_is_not_an_integer_in_range(value: object) -> None:
    refused(converters.epoch_millis, value)


def test_epoch_seconds() -> None:
    assert converters.epoch_seconds(1793665800) == datetime(2026, 11, 3, 0, 30, tzinfo=UTC)
    refused(converters.epoch_seconds, "1793665800")


def test_rfc3339_gives_the_instant_it_denotes() -> None:
    # c-to-a.md "Columns": 2026-11-03T09:15:00+09:00 -> 2026-11-03 00:15:00+00
    parsed = converters.rfc3339("2026-11-03T09:15:00+09:00")
    assert parsed == datetime(2026, 11, 3, 0, 15, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(hours=9)
    assert converters.rfc3339("2026-11-03T00:15:00.123456Z") == datetime(2026, 11, 3, 0, 15, 0, 123456, tzinfo=UTC)
    assert converters.rfc3339("2026-11-02T19:15:00-05:00").tzinfo == timezone(timedelta(hours=-5))


@pytest.mark.parametrize("text", ["2026-11-03T09:15:00", "2026-11-03", "yesterday", "", 1793665800, None])
def test_rfc3339_refuses_no_offset_and_non_times(text: object) -> None:
    refused(converters.rfc3339, text)


# --- keys and buckets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["v2/2026/11/03/febbb0c7/3/0017.dcm", "a.dcm", "a/.hidden/b..dcm", "a/...", "x y/é/1.dcm"]
)
def test_relative_key_is_stored_unchanged(key: str) -> None:
    assert converters.relative_key(key) == key


@pytest.mark.parametrize("key", ["", "/a/b.dcm", "a//b", "a/b/", "./a", "a/./b", "a/../b", "..", "."])
def test_relative_key_refuses_c_to_a_bad_keys(key: str) -> None:
    refused(converters.relative_key, key)


@pytest.mark.parametrize(("path", "key"), [("/a.dcm", "a.dcm"), ("/2026/.hidden/img..dcm", "2026/.hidden/img..dcm")])
def test_absolute_key_drops_the_leading_slash(path: str, key: str) -> None:
    assert converters.absolute_key(path) == key


@pytest.mark.parametrize("path", ["a.dcm", "/", "//a", "/a//b", "/a/", "/./a", "/a/../b", "/.."])
def test_absolute_key_refuses_b_to_a_bad_paths(path: str) -> None:
    refused(converters.absolute_key, path)


def test_allowed_bucket_is_compared_exactly() -> None:
    allowed = frozenset({"c-archive-eu-1", "c-archive-eu-2"})
    assert converters.allowed_bucket("c-archive-eu-2", allowed) == "c-archive-eu-2"
    for bucket in ("C-archive-eu-1", "c-archive-eu-1 ", "c-archive-eu-3", ""):
        refused(converters.allowed_bucket, bucket, allowed)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("260088bd-fad9-493b-a062-8b83443b76fe", True),
        ("260088BD-FAD9-493B-A062-8B83443B76FE", False),  # lower-case only (c-to-a.md)
        ("260088bdfad9493ba0628b83443b76fe", False),
        ("{260088bd-fad9-493b-a062-8b83443b76fe}", False),
        ("260088bd-fad9-493b-a062-8b83443b76f", False),
        ("", False),
    ],
)
def test_uuid_text(text: str, ok: bool) -> None:
    if ok:
        assert converters.uuid_text(text) == text
    else:
        refused(converters.uuid_text, text)


def test_nul_removal_keeps_every_other_character() -> None:
    text = "tab\there\nnew\r\n\\ \"q\" 'q' 한국어 🙂"
    assert converters.remove_nul(text) == text
    assert converters.remove_nul("a\x00b\x00") == "ab"


# --- the escape hatch ----------------------------------------------------------------------------------------


def test_python_converter_loads_a_function() -> None:
    assert converters.load_python("medsync.sources.rest.converters:int_string")("7") == 7


@pytest.mark.parametrize(
    "dotted",
    [
        "no_colon",
        "medsync.nope:f",
        "medsync.sources.rest.converters:nope",
        "medsync.sources.rest.converters:WHITE_SPACE",
    ],
)
def test_python_converter_that_does_not_resolve_is_a_config_error(dotted: str) -> None:
    with pytest.raises(ConfigError):
        converters.load_python(dotted)


def test_every_converter_the_spec_names_exists() -> None:
    plain = CONVERTERS - {"config_bucket"}  # config_bucket reads nothing: the parser fills the configured bucket
    assert all(callable(getattr(converters, name, None)) for name in plain), sorted(plain)


# --- what each converter returns (checked against A's column when a spec loads) ----------------------

SAMPLES: dict[str, tuple[object, ...]] = {
    "rfc3339": ("2026-11-03T00:00:00Z",),
    "epoch_seconds": (1793664000,),
    "epoch_millis": (1793664000000,),
    "iso_date": ("1984-06-17",),
    "dicom_da": ("19840617",),
    "pn_comma": ("Kim, Minji",),
    "pn_parts": ("Kim", "Minji"),
    "int_string": ("007",),
    "absolute_key": ("/a/b.dcm",),
    "relative_key": ("a/b.dcm",),
    "allowed_bucket": ("b1", {"b1"}),
    "uuid_text": ("260088bd-fad9-493b-a062-8b83443b76fe",),
}


@pytest.mark.parametrize("name", sorted(CONVERTERS - {"config_bucket"}))
def test_every_converter_returns_the_type_it_declares(name: str) -> None:
    made = getattr(converters, name)(*SAMPLES[name])
    assert type(made) is OUTPUT_TYPES[name]
    if isinstance(made, datetime):
        assert made.utcoffset() is not None  # a timestamptz needs the offset


def test_every_converter_declares_its_output_type() -> None:
    assert set(OUTPUT_TYPES) == CONVERTERS
