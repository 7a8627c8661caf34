"""Service B's records: validation (pydantic) and the agreed B -> A mapping (b-to-a.md).

``RecordParser.parse(level, raw)`` turns one record dict from B's API into a
``StagedRecord`` ready for the staging table, or raises ``RecordRejected`` with
the reason the record is held back. Reasons name fields and rules, never values
of PHI fields, because they end up in logs as counts by reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from medsync.errors import MappingError
from medsync.mapping import Mapping, UnknownValue


class RecordRejected(ValueError):
    """The record cannot be stored as it is; ``reason`` says why (no record contents)."""

    def __init__(self, reason: str, source_key: str, updated_at: datetime | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source_key = source_key
        self.updated_at = updated_at


@dataclass(frozen=True, slots=True)
class StagedRecord:
    source_key: str
    updated_at: datetime
    deleted: bool
    values: tuple[Any, ...]
    """In ``medsync.levels.staged_columns(level)`` order; all None for a tombstone."""


def _rfc3339(value: object) -> datetime:
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


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: object) -> date | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise ValueError("must be a YYYY-MM-DD date")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError("is not a valid YYYY-MM-DD date") from None


Timestamp = Annotated[datetime, BeforeValidator(_rfc3339)]
OptionalTimestamp = Annotated[datetime | None, BeforeValidator(lambda v: None if v is None else _rfc3339(v))]
IsoDate = Annotated[date | None, BeforeValidator(_iso_date)]
Text = Annotated[str | None, Field(strict=True)]


class _Envelope(BaseModel):
    """What every record, tombstones included, must carry."""

    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    updated_at: Timestamp
    deleted: StrictBool


class _Name(BaseModel):
    model_config = ConfigDict(extra="ignore")
    family: Text = None
    given: Text = None


class Patient(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mrn: Text = None
    name: _Name | None = None
    gender: Text = None
    birth_date: IsoDate = None


class Study(BaseModel):
    model_config = ConfigDict(extra="ignore")
    patient_id: Text = None
    study_uid: Text = None
    accession_no: Text = None
    performed_at: OptionalTimestamp = None
    description: Text = None
    status: Text = None


class Series(BaseModel):
    model_config = ConfigDict(extra="ignore")
    study_id: Text = None
    series_uid: Text = None
    number: StrictInt | None = None
    modality: Text = None
    body_part: Text = None
    description: Text = None


class Image(BaseModel):
    model_config = ConfigDict(extra="ignore")
    series_uid: Text = None
    sop_uid: Text = None
    number: StrictInt | None = None
    file_path: Text = None
    file_size: StrictInt | None = None
    content_type: Text = None


MODELS: dict[str, type[BaseModel]] = {"subject": Patient, "study": Study, "sequence": Series, "instance": Image}

REQUIRED: dict[str, tuple[str, ...]] = {
    "subject": ("mrn",),
    "study": ("study_uid", "status", "patient_id"),
    "sequence": ("series_uid", "modality", "study_id"),
    "instance": ("sop_uid", "series_uid", "file_path"),
}

_INT4 = 2**31


def _explain(exc: ValidationError) -> str:
    # pydantic's msg never includes the input value; loc + msg is safe to log and store.
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors())


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; everything else is kept exactly as sent."""
    return text.replace("\x00", "") if text is not None and "\x00" in text else text


def _pn_part(part: str | None) -> str | None:
    if part is None:
        return None
    part = _clean(part) or ""
    part = part.replace("^", " ").replace("=", " ")
    return part or None


def patient_name(name: _Name | None) -> str | None:
    """DICOM PN form as A stores it: ``Family^Given``, ``Family``, ``^Given`` or NULL."""
    if name is None:
        return None
    family, given = _pn_part(name.family), _pn_part(name.given)
    if family is None and given is None:
        return None
    if given is None:
        return family
    return f"{family or ''}^{given}"


def storage_key(file_path: str) -> str:
    """B's absolute ``file_path`` -> A's ``storage_key``; raises ValueError when not a safe absolute key."""
    if not file_path.startswith("/"):
        raise ValueError("file_path: must be an absolute key starting with '/'")
    segments = file_path[1:].split("/")
    if any(s == "" for s in segments):
        raise ValueError("file_path: has an empty segment ('//' or a trailing '/')")
    if any(s in (".", "..") for s in segments):
        raise ValueError("file_path: has a '.' or '..' segment")
    return file_path[1:]


def synthetic_key(raw: object) -> str:
    """A stable key for a record whose own id is unusable, so it can still be quarantined."""
    body = json.dumps(raw, sort_keys=True, default=str).encode()
    return "?sha256:" + hashlib.sha256(body).hexdigest()[:32]


MAPPED_COLUMNS: dict[str, tuple[str, ...]] = {
    "subject": ("sex",),
    "study": ("status",),
    "sequence": ("modality", "body_part", "laterality"),
    "instance": (),
}
"""A columns that B's protocol fills only through the mapping file (vocabularies)."""


class RecordParser:
    """Validates and maps B's records for one source configuration (mapping + bucket)."""

    def __init__(self, mapping: Mapping, bucket: str) -> None:
        for level, columns in MAPPED_COLUMNS.items():
            fed = {c for entry in mapping.entries(level) for c in entry.columns}
            missing = [c for c in columns if c not in fed]
            if missing:
                where = mapping.path or "the mapping"
                raise MappingError(f"{where}: {level} has no entry feeding {', '.join(missing)}")
        self.mapping = mapping
        self.bucket = bucket

    def parse(self, level: str, raw: object) -> StagedRecord:
        if not isinstance(raw, dict):
            raise RecordRejected("record: is not a JSON object", synthetic_key(raw), None)
        try:
            envelope = _Envelope.model_validate(raw)
        except ValidationError as exc:
            key = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else synthetic_key(raw)
            when = None
            try:
                when = _rfc3339(raw.get("updated_at"))
            except ValueError:
                pass
            raise RecordRejected(_explain(exc), _clean(key) or synthetic_key(raw), when) from None
        key = _clean(envelope.id) or synthetic_key(raw)
        if envelope.deleted:
            return StagedRecord(key, envelope.updated_at, True, ())
        try:
            values = self._live_values(level, raw)
        except ValidationError as exc:
            raise RecordRejected(_explain(exc), key, envelope.updated_at) from None
        except (UnknownValue, ValueError) as exc:
            raise RecordRejected(str(exc), key, envelope.updated_at) from None
        return StagedRecord(key, envelope.updated_at, False, values)

    def _live_values(self, level: str, raw: dict[str, Any]) -> tuple[Any, ...]:
        record = MODELS[level].model_validate(raw)
        # Emptiness is judged on what A would store, i.e. after NUL removal.
        missing = [f for f in REQUIRED[level] if not _clean(getattr(record, f))]
        if missing:
            raise ValueError(f"required field missing or empty: {', '.join(missing)}")
        mapped = self.mapping.apply(level, record.model_dump(include={e.field for e in self.mapping.entries(level)}))
        if isinstance(record, Patient):
            return (_clean(record.mrn), patient_name(record.name), mapped["sex"], record.birth_date)
        if isinstance(record, Study):
            return (
                _clean(record.patient_id),
                _clean(record.study_uid),
                _clean(record.accession_no),
                record.performed_at,
                _clean(record.description),
                mapped["status"],
            )
        if isinstance(record, Series):
            _check_int4("number", record.number)
            return (
                _clean(record.study_id),
                _clean(record.series_uid),
                record.number,
                mapped["modality"],
                mapped["body_part"],
                mapped["laterality"],
                _clean(record.description),
            )
        assert isinstance(record, Image)
        _check_int4("number", record.number)
        if record.file_size is not None and not 0 <= record.file_size < 2**63:
            raise ValueError("file_size: out of range")
        return (
            _clean(record.series_uid),
            _clean(record.sop_uid),
            record.number,
            self.bucket,
            storage_key(_clean(record.file_path) or ""),
            record.file_size,
            _clean(record.content_type),
        )


def _check_int4(field: str, value: int | None) -> None:
    if value is not None and not -_INT4 <= value < _INT4:
        raise ValueError(f"{field}: out of range for an integer column")
