"""Instants as integer microseconds since the Unix epoch, and their RFC 3339 spellings.

The simulator keeps every instant as an ``int`` of microseconds (UTC) so that ordering
and window arithmetic are exact; only the wire format carries offsets. Parsing is
strict RFC 3339 (an offset is required) so that a client bug such as an unencoded
``+`` in a query string is answered 400, as a real server would.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

US_PER_S = 1_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

# Offsets B is seen to send; several per record set so that one instant is spelled many ways.
OFFSETS: tuple[tuple[int, str], ...] = (
    (0, "Z"),
    (9 * 3600, "+09:00"),
    (-5 * 3600, "-05:00"),
    (0, "+00:00"),
    (5 * 3600 + 1800, "+05:30"),
    (-(3 * 3600 + 1800), "-03:30"),
    (14 * 3600, "+14:00"),
    (-12 * 3600, "-12:00"),
    (1 * 3600, "+01:00"),
    (0, "Z"),
    (9 * 3600, "+09:00"),
)

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)

_date_cache: dict[int, str] = {}
# "HH:MM:SS" for every second of a day (~5 MB, built once): formatting is the hot path of paging.
_HMS: tuple[str, ...] = tuple(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400))


def date_str(day: int) -> str:
    """``YYYY-MM-DD`` of a day number (days since 1970-01-01)."""
    s = _date_cache.get(day)
    if s is None:
        s = date.fromordinal(day + _EPOCH_ORDINAL).isoformat()
        if len(_date_cache) > 100_000:  # bounded: far more days than any data set spans
            _date_cache.clear()
        _date_cache[day] = s
    return s


def render(t_us: int, style: int) -> str:
    """RFC 3339 text for instant ``t_us``; ``style`` (any int, e.g. a hash) picks offset and digits.

    Whole seconds are written without a fraction; whole milliseconds as 3 or 6 digits;
    other values as 6 digits, sometimes with trailing zeros trimmed.
    """
    off_s, suffix = OFFSETS[style % len(OFFSETS)]
    s, us = divmod(t_us, US_PER_S)
    s += off_s
    day, sod = divmod(s, 86400)
    if us == 0:
        frac = ""
    elif us % 1000 == 0 and (style >> 8) & 1:
        frac = f".{us // 1000:03d}"
    else:
        frac = f".{us:06d}"
        if (style >> 9) & 3 == 0:
            frac = frac.rstrip("0")
    return f"{date_str(day)}T{_HMS[sod]}{frac}{suffix}"


def render_utc(t_us: int) -> str:
    """Canonical ``...Z`` spelling with 6 fractional digits (for ``as_of`` and admin answers)."""
    s, us = divmod(t_us, US_PER_S)
    day, sod = divmod(s, 86400)
    return f"{date_str(day)}T{_HMS[sod]}.{us:06d}Z"


def parse(text: str, *, ceil: bool = True) -> int:
    """Parse RFC 3339 into microseconds; raise ``ValueError`` if it is not RFC 3339 with an offset.

    More than 6 fractional digits are rounded up when ``ceil`` (right for both bounds of a
    half-open window over microsecond instants), else truncated.
    """
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 date-time with offset: {text!r}")
    year, month, day, hh, mi, ss = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    if hh > 23 or mi > 59 or ss > 60:
        raise ValueError(f"time out of range: {text!r}")
    ss = min(ss, 59)  # a leap second is the last instant of its minute
    try:
        d = date(year, month, day)
    except ValueError as exc:
        raise ValueError(f"invalid date: {text!r}") from exc
    us = int(frac[:6].ljust(6, "0")) if frac else 0
    if ceil and len(frac) > 6 and int(frac[6:]) > 0:
        us += 1
    off = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError(f"offset out of range: {text!r}")
        off = (oh * 3600 + om * 60) * (1 if m.group(9) == "+" else -1)
    secs = (d.toordinal() - _EPOCH_ORDINAL) * 86400 + hh * 3600 + mi * 60 + ss - off
    return secs * US_PER_S + us


def to_us(value: datetime | str | float | int) -> int:
    """Microseconds for an aware datetime, an RFC 3339 string or epoch seconds (int/float)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone")
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86400 + delta.seconds) * US_PER_S + delta.microseconds
    if isinstance(value, str):
        return parse(value)
    return round(value * US_PER_S)


def to_datetime(t_us: int) -> datetime:
    """Aware UTC datetime for microseconds since the epoch."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t_us)
