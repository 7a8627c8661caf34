"""What A must hold for source C, computed from the simulator of C by ``shared/contracts/c-to-a.md``.

Written from the contract's rules, never from medsync's converters: the name steps, DICOM DA
dates, integer strings, RFC 3339 instants, the values tables, NUL removal, the held-back
records (the simulator says which live records carry a defect) and their descendants waiting.
Used by the end-to-end tests of C and by the side-by-side test of B and C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from simulator_c import CSimulator

LEVEL_RESOURCE = {"subject": "participants", "study": "visits", "sequence": "acquisitions", "instance": "files"}
PARENT_FIELD = {"study": "participant", "sequence": "visit", "instance": "acquisition"}
PARENT_LEVEL = {"study": "subject", "sequence": "study", "instance": "sequence"}
PARENT_COLUMN = {"study": "subject_id", "sequence": "study_id", "instance": "sequence_id"}

# c-to-a.md "Values".
SEX = {"m": "M", "f": "F", "x": "O", "u": None, None: None}
STATE = {"planned": "REQUESTED", "scanning": "ACQUIRING", "complete": "COMPLETED", "aborted": "CANCELLED"}
MODALITY = {"mr": "MR", "ct": "CT", "pet": "PT", "pet_ct": "PT", "xr": "DX", "us": "US", "mg": "MG", "nm": "NM",
            "other": "OT"}  # fmt: skip
ANATOMY = {"head": "HEAD", "brain": "BRAIN", "neck": "NECK", "chest": "CHEST", "abdomen": "ABDOMEN",
           "pelvis": "PELVIS", "c_spine": "CSPINE", "t_spine": "TSPINE", "l_spine": "LSPINE",
           "shoulder": "SHOULDER", "knee": "KNEE", "hand": "HAND", "foot": "FOOT", "breast": "BREAST",
           "whole_body": "WHOLEBODY", None: None}  # fmt: skip
SIDE = {"left": "L", "right": "R", "bilateral": "B", None: None}

# The Unicode White_Space property (PropList.txt), which c-to-a.md's trimming names. Python's
# str.strip() also strips U+001C..U+001F, which are not White_Space.
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
INTEGER_STRING = re.compile(r"[+-]?[0-9]+")


def text(value: Any) -> Any:
    """Text as A stores it: NUL removed, everything else kept."""
    return value.replace("\x00", "") if isinstance(value, str) else value


def patient_name(display_name: str | None) -> str | None:
    """c-to-a.md "Names": split at the first comma, ^ and = to spaces, trim White_Space."""
    if display_name is None:
        return None
    family, comma, given = text(display_name).partition(",")
    parts = [p.replace("^", " ").replace("=", " ").strip(WHITE_SPACE) for p in (family, given if comma else "")]
    family, given = parts
    if family and given:
        return f"{family}^{given}"
    if family:
        return family
    if given:
        return f"^{given}"
    return None


def birth_date(dob: str | None) -> date | None:
    if dob is None:
        return None
    assert len(dob) == 8 and dob.isascii() and dob.isdigit(), "a bad dob is a defect"
    return date(int(dob[:4]), int(dob[4:6]), int(dob[6:]))


def instant(started: str | None) -> datetime | None:
    if started is None:
        return None
    parsed = datetime.fromisoformat(started.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, "a started without offset is a defect"
    return parsed.astimezone(UTC)


def series_number(series_no: str | None) -> int | None:
    if series_no is None:
        return None
    assert INTEGER_STRING.fullmatch(series_no), "a bad series_no is a defect"
    return int(series_no)


def millis(ms: int) -> datetime:
    """Epoch milliseconds as a UTC instant, exact to the millisecond."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def row_of(level: str, rec: dict[str, Any]) -> tuple[Any, ...]:
    """The A columns of a live C record (parent as the parent's source_key), in ``COLUMNS`` order."""
    if level == "subject":
        identifiers = rec["identifiers"]
        values: tuple[Any, ...] = (text(identifiers["mrn"]), patient_name(rec["display_name"]), SEX[rec["sex"]],
                                   birth_date(rec["dob"]))  # fmt: skip
    elif level == "study":
        values = (rec["participant"], text(rec["study_instance_uid"]), text(rec["accession"]),
                  instant(rec["started"]), text(rec["label"]), STATE[rec["state"]])  # fmt: skip
    elif level == "sequence":
        values = (rec["visit"], text(rec["series_instance_uid"]), series_number(rec["series_no"]),
                  MODALITY[rec["modality"]], ANATOMY[rec["anatomy"]], SIDE[rec["side"]],
                  text(rec["notes"]))  # fmt: skip
    else:
        obj = rec["object"]
        values = (rec["acquisition"], text(rec["sop_instance_uid"]), rec["index"], obj["bucket"], obj["key"],
                  rec["bytes"], text(rec["mime"]))  # fmt: skip
    return (*values, millis(rec["modified"]))


COLUMNS = {
    "subject": "t.patient_code, t.patient_name, t.sex, t.birth_date",
    "study": "p.source_key, t.study_uid, t.accession_number, t.study_at, t.description, t.status",
    "sequence": "p.source_key, t.series_uid, t.series_number, t.modality, t.body_part, t.laterality, t.description",
    "instance": "p.source_key, t.sop_instance_uid, t.instance_number, t.storage_bucket, t.storage_key,"
    " t.size_bytes, t.content_type",
}


def a_rows(conn: psycopg.Connection[Any], level: str, *, live: bool = True) -> dict[str, tuple[Any, ...]]:
    """A's rows of source c of a level: source_key -> the ``row_of`` columns."""
    if level == "subject":
        query = f"SELECT t.source_key, {COLUMNS[level]}, t.source_updated_at FROM imaging.subject t"
    else:
        query = (
            f"SELECT t.source_key, {COLUMNS[level]}, t.source_updated_at FROM imaging.{level} t"
            f" JOIN imaging.{PARENT_LEVEL[level]} p ON p.id = t.{PARENT_COLUMN[level]}"
        )
    query += " WHERE t.source_system = 'c'" + (" AND t.deleted_at IS NULL" if live else "")
    return {r[0]: tuple(r[1:]) for r in conn.execute(query)}


@dataclass
class Expected:
    """A's live rows of C by the contract: source_key -> columns, per level; and what waits."""

    live: dict[str, dict[str, tuple[Any, ...]]]
    held_back: dict[str, dict[str, str]]
    """uuid -> defect kind of live C records A must hold back, per level."""
    waiting: dict[str, set[str]]
    """Live, storable C records whose parent A cannot link (held back, deleted or unknown), per level."""


def expected(sim: CSimulator, kept: frozenset[str] = frozenset()) -> Expected:
    """C's live records whose ancestors are all live and storable, as A's rows (``kept``: records
    the caller checks itself; they count as parents A holds)."""
    live: dict[str, dict[str, tuple[Any, ...]]] = {}
    held: dict[str, dict[str, str]] = {}
    waiting: dict[str, set[str]] = {}
    parent_keys: set[str] = set()
    for level, resource in LEVEL_RESOURCE.items():
        held[level] = sim.defects(resource)
        live[level], waiting[level] = {}, set()
        kept_here: set[str] = set()
        for rec in sim.live_records(resource):
            if rec["uuid"] in kept:
                kept_here.add(rec["uuid"])
                continue
            if rec["uuid"] in held[level]:
                continue
            if level != "subject" and rec[PARENT_FIELD[level]] not in parent_keys:
                waiting[level].add(rec["uuid"])
                continue
            live[level][rec["uuid"]] = row_of(level, rec)
        parent_keys = set(live[level]) | kept_here
    return Expected(live, held, waiting)


def assert_a_matches_c(
    conn: psycopg.Connection[Any], sim: CSimulator, *, kept: frozenset[str] = frozenset()
) -> Expected:
    """Field by field: every live C record A can store is a live A row with the agreed values, and
    no other C row is live; every deleted C row says when (its own item, or its parent's).

    ``kept``: keys of records whose newest version A holds back or cannot link yet while A keeps
    their last good version (checked by the caller)."""
    want = expected(sim, kept)
    for level in LEVEL_RESOURCE:
        have = {k: v for k, v in a_rows(conn, level).items() if k not in kept}
        missing = sorted(set(want.live[level]) - set(have))
        extra = sorted(set(have) - set(want.live[level]))
        assert not missing and not extra, f"{level}: missing {missing[:3]}, extra {extra[:3]}"
        wrong = {k: (have[k], v) for k, v in want.live[level].items() if have[k] != v}
        assert not wrong, f"{level}: {len(wrong)} rows differ, e.g. {next(iter(wrong.items()))}"
    assert_deletions_explained(conn, sim, kept)
    return want


def assert_deletions_explained(conn: psycopg.Connection[Any], sim: CSimulator, kept: frozenset[str]) -> None:
    """A deleted C row carries its own newest deletion item's time, or its deleted parent's."""
    items = {(i["resource"], i["uuid"]): millis(i["deleted"]) for i in sim.deletions()}
    for level, resource in LEVEL_RESOURCE.items():
        if level == "subject":
            query = "SELECT t.source_key, t.deleted_at, NULL FROM imaging.subject t"
        else:
            query = (
                f"SELECT t.source_key, t.deleted_at, p.deleted_at FROM imaging.{level} t"
                f" JOIN imaging.{PARENT_LEVEL[level]} p ON p.id = t.{PARENT_COLUMN[level]}"
            )
        for key, deleted_at, parent_deleted_at in conn.execute(
            query + " WHERE t.source_system = 'c' AND t.deleted_at IS NOT NULL"
        ):
            if key in kept:
                continue
            own = items.get((resource, key)) if sim.is_deleted(resource, key) else None
            assert deleted_at in (own, parent_deleted_at), (level, key, deleted_at, own, parent_deleted_at)
