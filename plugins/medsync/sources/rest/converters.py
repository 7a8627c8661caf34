"""The converters a REST source's ``api:`` section names (``convert: <name>``), one function each.

A converter turns a record's raw JSON value (or values, for ``pn_parts``) into what A's column
stores, or raises ``ValueError`` with the *rule* that failed. Its message never contains the
value: the record parser prefixes it with the source field's path and uses it as the reason the
record is held back (reasons are logged as counts, and the values may be PHI).

The rules are the contracts' (``shared/contracts/b-to-a.md``, ``c-to-a.md``, ``a-model.md``); each
function's docstring says which. ``python: package.module:function`` in a spec names a converter
of the same shape outside this module (:func:`load_python`).

Only the standard library is imported: the record parser imports this module once per task.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

from medsync.errors import ConfigError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Unicode White_Space (PropList.txt): what c-to-a.md's name rule trims. Not str.strip()'s idea of
# space, which also strips U+001C..U+001F (not White_Space).
WHITE_SPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

INTEGER_RANGE = (-(2**31), 2**31 - 1)
"""A's ``integer`` column (PostgreSQL int4), inclusive bounds."""
BIGINT_RANGE = (-(2**63), 2**63 - 1)
"""A's ``bigint`` column (PostgreSQL int8), inclusive bounds."""


def remove_nul(text: str) -> str:
    """``text`` without NUL characters, which PostgreSQL text cannot hold; every other character kept.

    b-to-a.md and c-to-a.md: "stored with the NUL removed; the checks see the text without it".
    """
    return text.replace("\x00", "") if "\x00" in text else text


def rfc3339(value: object) -> datetime:
    """An RFC 3339 date-time with an offset (``Z``/``z``, ``+HH:MM``, ``-HH:MM``) -> the aware instant.

    Fractions are kept to the microsecond. A date alone, a date-time without an offset (A never
    guesses a zone: b-to-a.md, c-to-a.md "started"), or anything but a string is refused.
    """
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" else text)
    except ValueError:
        raise ValueError("is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None or "T" not in text.upper():
        raise ValueError("must be an RFC 3339 date-time with a time zone offset")
    return parsed


def _strict_int(value: object, what: str) -> int:
    # JSON true/false are Python bools, which are ints: a flag is not a number.
    if type(value) is not int:
        raise ValueError(f"must be {what} (a JSON integer)")
    return value


def epoch_seconds(value: object) -> datetime:
    """Integer seconds since 1970-01-01T00:00:00Z (a JSON integer) -> the aware UTC instant."""
    seconds = _strict_int(value, "epoch seconds")
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError("epoch seconds: out of range") from None


def epoch_millis(value: object) -> datetime:
    """Integer milliseconds since the epoch (a JSON integer) -> the UTC instant, exact to the millisecond.

    c-to-a.md: ``1793666537381`` -> ``2026-11-03 00:42:17.381+00``. A string or a float is refused.
    """
    millis = _strict_int(value, "epoch milliseconds")
    try:
        return _EPOCH + timedelta(milliseconds=millis)
    except OverflowError:
        raise ValueError("epoch milliseconds: out of range") from None


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DICOM_DA = re.compile(r"[0-9]{8}")


def iso_date(value: object) -> date | None:
    """``YYYY-MM-DD`` (b-to-a.md ``birth_date``) -> the date; null -> None; anything else is refused.

    ISO week dates, ``YYYYMMDD``, one-digit months and impossible dates (``1980-02-30``) do not parse.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
        raise ValueError("must be a YYYY-MM-DD date")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError("is not a valid YYYY-MM-DD date") from None


def dicom_da(value: object) -> date | None:
    """A DICOM DA (c-to-a.md ``dob``): exactly eight ASCII digits forming a real date ``YYYYMMDD``.

    ``"19840617"`` -> 1984-06-17; null -> None; ``"19840230"``, ``"1984-06-17"``, ``"198406"``,
    ``""`` are refused.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _DICOM_DA.fullmatch(value):
        raise ValueError("must be a DICOM DA date (YYYYMMDD)")
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise ValueError("is not a valid YYYYMMDD date") from None


def _text_or_none(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what}: Input should be a valid string")
    return remove_nul(value)


def _pn_component(part: str | None) -> str | None:
    # DICOM PN reserves '^' (component) and '=' (group) separators (a-model.md).
    if part is None:
        return None
    part = part.replace("^", " ").replace("=", " ")
    return part or None


def _pn(family: str | None, given: str | None) -> str | None:
    """a-model.md's PN form: ``Family^Given``, ``Family``, ``^Given`` or None."""
    if family is None and given is None:
        return None
    if given is None:
        return family
    return f"{family or ''}^{given}"


def pn_parts(family: object, given: object) -> str | None:
    """b-to-a.md ``name.family``/``name.given`` -> A's PN form (a-model.md).

    NUL removed, every ``^`` and ``=`` replaced by a space, nothing trimmed; an empty part is
    missing. Family and given -> ``Family^Given``; family only -> ``Family``; given only ->
    ``^Given``; neither -> None (stored, not held back). A part that is not a string or null is refused.
    """
    return _pn(_pn_component(_text_or_none(family, "family")), _pn_component(_text_or_none(given, "given")))


def pn_comma(value: object) -> str | None:
    """c-to-a.md ``display_name`` (``"Family, Given"``) -> A's PN form, in c-to-a.md's steps.

    1. Split at the first comma: family before, given after; without a comma all of it is family.
    2. In each part replace every ``^`` and ``=`` with a space, then trim Unicode White_Space; an
       empty part is missing.
    3. As :func:`pn_parts` step 3: ``Family^Given``, ``Family``, ``^Given`` or None.

    Inner spaces, later commas and case are kept. NUL is removed first. Null -> None.
    """
    text = _text_or_none(value, "display_name")
    if text is None:
        return None
    family, comma, given = text.partition(",")

    def part(raw: str) -> str | None:
        return raw.replace("^", " ").replace("=", " ").strip(WHITE_SPACE) or None

    return _pn(part(family), part(given) if comma else None)


_INT_STRING = re.compile(r"[+-]?[0-9]+")


def int_string(value: object) -> int | None:
    """c-to-a.md ``series_no``: an optional ``+``/``-`` and ASCII digits, nothing else, within A's ``integer``.

    ``"3"`` -> 3, ``"007"`` -> 7, ``"-1"`` -> -1; null -> None. ``""``, ``" 3"``, ``"3.0"``, ``"3a"``,
    ``"99999999999"`` and a JSON number are refused.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be an integer string (a JSON string)")
    text = remove_nul(value)
    if not _INT_STRING.fullmatch(text):
        raise ValueError("is not an integer string")
    number = int(text)
    check_range(number, INTEGER_RANGE, "integer")
    return number


def check_range(number: int, bounds: tuple[int, int], column_type: str) -> int:
    """``number`` if it fits A's column type (``bounds`` inclusive), else ValueError naming the type."""
    if not bounds[0] <= number <= bounds[1]:
        raise ValueError(f"out of range for an {column_type} column")
    return number


def _key_segments(key: str) -> None:
    segments = key.split("/")
    if "" in segments:
        raise ValueError("has an empty segment ('//' or a trailing '/')")
    if "." in segments or ".." in segments:
        raise ValueError("has a '.' or '..' segment")


def absolute_key(value: str) -> str:
    """b-to-a.md ``file_path``: an absolute key ``/a/b.dcm`` -> A's ``storage_key`` ``a/b.dcm``.

    Refused: no leading ``/``; an empty segment (``//``, a trailing ``/``, ``/`` alone); a ``.`` or
    ``..`` segment. Dots inside a name are kept (``/2026/.hidden/img..dcm``). ``value`` is text
    with NUL already removed.
    """
    if not value.startswith("/"):
        raise ValueError("must be an absolute key starting with '/'")
    _key_segments(value[1:])
    return value[1:]


def relative_key(value: str) -> str:
    """c-to-a.md ``object.key``: a relative key, stored unchanged.

    Refused: empty, a leading ``/``, an empty segment (``a//b``, a trailing ``/``), a ``.`` or
    ``..`` segment. ``value`` is text with NUL already removed.
    """
    if not value:
        raise ValueError("must be a non-empty key")
    if value.startswith("/"):
        raise ValueError("must be a relative key (no leading '/')")
    _key_segments(value)
    return value


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def uuid_text(value: str) -> str:
    """c-to-a.md: a key or link that must be lower-case UUID text (36 characters, ``8-4-4-4-12`` hex)."""
    if not _UUID.fullmatch(value):
        raise ValueError("must be lower-case UUID text")
    return value


def allowed_bucket(value: str, allowed: Collection[str]) -> str:
    """c-to-a.md ``object.bucket``: kept when it is one of the source's allowed buckets (compared exactly)."""
    if value not in allowed:
        raise ValueError("is not one of the buckets allowed for this source")
    return value


def load_python(dotted: str) -> Callable[..., Any]:
    """The escape hatch ``python: package.module:function``, imported from ``plugins/``.

    The function is called with the raw value(s) like the converters here and raises
    ``ValueError`` (its message a rule, never the value) to hold the record back. Raises
    ``ConfigError`` when the name does not resolve to a callable.
    """
    module_name, colon, attribute = dotted.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"python converter {dotted!r}: must be 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"python converter {dotted!r}: cannot be imported: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"python converter {dotted!r}: is not callable")
    return function  # type: ignore[no-any-return]
