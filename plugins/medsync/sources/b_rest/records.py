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
from datetime import date, datetime
from typing import Annotated, Any, NoReturn

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from medsync.errors import MappingError
from medsync.mapping import Mapping, UnknownValue
from medsync.sources.base import RecordRejected, StagedRecord


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


# Envelope and content in one model, so that a good record costs one validation instead of two
# (parsing is most of a pull's CPU). Only the fast path uses them: a record they refuse is
# parsed again step by step, which is what explains (and so defines) every rejection.
class _PatientRecord(Patient, _Envelope):
    pass


class _StudyRecord(Study, _Envelope):
    pass


class _SeriesRecord(Series, _Envelope):
    pass


class _ImageRecord(Image, _Envelope):
    pass


_WHOLE_RECORDS: dict[str, type[BaseModel]] = {
    "subject": _PatientRecord,
    "study": _StudyRecord,
    "sequence": _SeriesRecord,
    "instance": _ImageRecord,
}

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
    if "" in segments:
        raise ValueError("file_path: has an empty segment ('//' or a trailing '/')")
    if "." in segments or ".." in segments:
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
        # Per level, the fields the mapping reads (computed once: parse runs for every record).
        self._mapped_fields = {level: frozenset(e.field for e in mapping.entries(level)) for level in MODELS}

    def parse(self, level: str, raw: object) -> StagedRecord:
        whole = _WHOLE_RECORDS.get(level)
        if whole is not None and isinstance(raw, dict):
            try:
                record = whole.model_validate(raw)
            except ValidationError:
                pass  # the step-by-step path below says why
            else:
                return self._staged(level, raw, record)
        return self._parse_step_by_step(level, raw)

    def _staged(self, level: str, raw: dict[str, Any], record: Any) -> StagedRecord:
        """The fast path: ``record`` passed the envelope and the content model in one validation."""
        key = _clean(record.id) or synthetic_key(raw)
        if record.deleted:
            return StagedRecord(key, record.updated_at, True, ())
        try:
            values = self._values(level, record)
        except (UnknownValue, ValueError) as exc:
            raise RecordRejected(str(exc), key, record.updated_at) from None
        return StagedRecord(key, record.updated_at, False, values)

    def _parse_step_by_step(self, level: str, raw: object) -> StagedRecord:
        """Envelope first, then content: the path whose reasons a rejected record is stored with."""
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
            values = self._values(level, MODELS[level].model_validate(raw))
        except ValidationError as exc:
            raise RecordRejected(_explain(exc), key, envelope.updated_at) from None
        except (UnknownValue, ValueError) as exc:
            raise RecordRejected(str(exc), key, envelope.updated_at) from None
        return StagedRecord(key, envelope.updated_at, False, values)

    def _values(self, level: str, record: Any) -> tuple[Any, ...]:
        """A validated live record's staged values; ValueError or UnknownValue when A cannot take it.

        Per level, in this order: required fields (judged on what A would store, i.e. after
        NUL removal), the mapping, then A's ranges. One method per level rather than one
        generic loop: this runs for every record a pull stages.
        """
        if level == "instance":
            return self._instance_values(record)
        if level == "sequence":
            return self._sequence_values(record)
        if level == "study":
            return self._study_values(record)
        return self._subject_values(record)

    def _mapped(self, level: str, record: BaseModel) -> dict[str, str | None]:
        fields = self._mapped_fields[level]
        return self.mapping.apply(level, record.model_dump(include=set(fields))) if fields else {}

    def _subject_values(self, record: Patient) -> tuple[Any, ...]:
        mrn = _clean(record.mrn)
        if not mrn:
            _refuse_missing("subject", {"mrn": mrn})
        mapped = self._mapped("subject", record)
        return (mrn, patient_name(record.name), mapped["sex"], record.birth_date)

    def _study_values(self, record: Study) -> tuple[Any, ...]:
        patient_id, study_uid, status = _clean(record.patient_id), _clean(record.study_uid), _clean(record.status)
        if not (study_uid and status and patient_id):
            _refuse_missing("study", {"study_uid": study_uid, "status": status, "patient_id": patient_id})
        mapped = self._mapped("study", record)
        return (
            patient_id,
            study_uid,
            _clean(record.accession_no),
            record.performed_at,
            _clean(record.description),
            mapped["status"],
        )

    def _sequence_values(self, record: Series) -> tuple[Any, ...]:
        study_id, series_uid, modality = _clean(record.study_id), _clean(record.series_uid), _clean(record.modality)
        if not (series_uid and modality and study_id):
            _refuse_missing("sequence", {"series_uid": series_uid, "modality": modality, "study_id": study_id})
        mapped = self._mapped("sequence", record)
        _check_int4("number", record.number)
        return (
            study_id,
            series_uid,
            record.number,
            mapped["modality"],
            mapped["body_part"],
            mapped["laterality"],
            _clean(record.description),
        )

    def _instance_values(self, record: Image) -> tuple[Any, ...]:
        series_uid, sop_uid, file_path = _clean(record.series_uid), _clean(record.sop_uid), _clean(record.file_path)
        if not (sop_uid and series_uid and file_path):
            _refuse_missing("instance", {"sop_uid": sop_uid, "series_uid": series_uid, "file_path": file_path})
        self._mapped("instance", record)  # no column of its own, but an unknown value still holds the record back
        _check_int4("number", record.number)
        if record.file_size is not None and not 0 <= record.file_size < 2**63:
            raise ValueError("file_size: out of range")
        return (
            series_uid,
            sop_uid,
            record.number,
            self.bucket,
            storage_key(file_path or ""),
            record.file_size,
            _clean(record.content_type),
        )


def _refuse_missing(level: str, cleaned: dict[str, str | None]) -> NoReturn:
    """Raises the reason for required fields that are missing or empty, in ``REQUIRED`` order."""
    assert set(cleaned) == set(REQUIRED[level]), "a level's values method checks exactly its REQUIRED fields"
    missing = [f for f in REQUIRED[level] if not cleaned[f]]
    raise ValueError(f"required field missing or empty: {', '.join(missing)}")


def _check_int4(field: str, value: int | None) -> None:
    if value is not None and not -_INT4 <= value < _INT4:
        raise ValueError(f"{field}: out of range for an integer column")
