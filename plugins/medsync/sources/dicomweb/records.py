"""DICOM JSON (QIDO-RS) -> A's columns, exactly as docs/dicomweb-mapping.md says.

Each raw item is one DICOM JSON object (PS3.18 F.2) as QIDO-RS answered it, annotated by the
client with its version under ``"_medsync"`` (``{"version": ISO time}``; see ``versions``).
Subjects are study items whose winning study gave the patient attributes (the client chose it).
Reasons name attributes and rules, never values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from medsync.errors import MappingError
from medsync.mapping import Mapping, UnknownValue
from medsync.sources.base import RawPage, RecordRejected, StagedRecord, synthetic_key

ANNOTATION = "_medsync"
CONTENT_TYPE = "application/dicom"
_INT4 = 2**31
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")

MAPPED: dict[str, dict[str, str]] = {
    # level: {DICOM keyword: tag} of the attributes read through the mapping file
    "subject": {"PatientSex": "00100040"},
    "study": {"StudyStatusID": "0032000A"},
    "sequence": {"Modality": "00080060", "BodyPartExamined": "00180015", "Laterality": "00200060"},
    "instance": {},
}
MAPPED_COLUMNS: dict[str, tuple[str, ...]] = {
    "subject": ("sex",),
    "study": ("status",),
    "sequence": ("modality", "body_part", "laterality"),
    "instance": (),
}


def _clean(text: str) -> str | None:
    text = text.replace("\x00", "").rstrip(" ")
    return text or None


def first_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object; None when absent, empty or the empty string."""
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    if isinstance(value, str):
        return _clean(value)
    return value


def text(item: dict[str, Any], tag: str, keyword: str) -> str | None:
    value = first_value(item, tag)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{keyword}: is not text")


def uid(item: dict[str, Any], tag: str, keyword: str) -> str | None:
    value = text(item, tag, keyword)
    if value is not None and (len(value) > 64 or not _UID.fullmatch(value)):
        raise ValueError(f"{keyword}: is not a DICOM UID")
    return value


def integer(item: dict[str, Any], tag: str, keyword: str) -> int | None:
    value = first_value(item, tag)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{keyword}: is not an integer")
    if isinstance(value, str):
        if not re.fullmatch(r"[+-]?\d{1,12}", value.strip()):
            raise ValueError(f"{keyword}: is not an integer")
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{keyword}: is not an integer")
    if not -_INT4 <= value < _INT4:
        raise ValueError(f"{keyword}: out of range for an integer column")
    return value


def _pn_part(part: str) -> str:
    return part.replace("=", " ").replace("^", " ").strip()


def _pn_group(group: object) -> tuple[str, str] | None:
    if not isinstance(group, str):
        return None
    components = [*group.split("^"), "", "", ""][:5]
    family, given, middle = _pn_part(components[0]), _pn_part(components[1]), _pn_part(components[2])
    if middle:
        given = f"{given} {middle}".strip()
    return (family, given) if family or given else None


def patient_name(value: object) -> str | None:
    """A DICOM JSON PN value (``{"Alphabetic": ..., "Ideographic": ...}``) in A's ``Family^Given`` form."""
    if value is None:
        return None
    if isinstance(value, str):  # a server that sends the PN string form
        value = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("="), strict=False))
    if not isinstance(value, dict):
        raise ValueError("PatientName: is not a person name")
    chosen = _pn_group(value.get("Alphabetic")) or _pn_group(value.get("Ideographic"))
    if chosen is None:
        return None
    family, given = (p.replace("\x00", "") for p in chosen)
    if not given:
        return family or None
    return f"{family}^{given}"


def dicom_date(value: str | None, keyword: str) -> date | None:
    if value is None:
        return None
    match = _DA.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{keyword}: is not a DICOM date (YYYYMMDD)")
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise ValueError(f"{keyword}: is not a valid date") from None


def dicom_time(value: str | None) -> time | None:
    if value is None:
        return None
    match = _TM.fullmatch(value.strip())
    if not match:
        raise ValueError("StudyTime: is not a DICOM time (HHMMSS.FFFFFF)")
    hour, minute, second = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    micro = int((match[4] or "0").ljust(6, "0"))
    if hour > 23 or minute > 59 or second > 60:
        raise ValueError("StudyTime: is not a valid time")
    return time(hour, minute, min(second, 59), micro)


def utc_offset(value: str | None) -> timezone | None:
    if value is None:
        return None
    match = _OFFSET.fullmatch(value.strip())
    if not match:
        raise ValueError("TimezoneOffsetFromUTC: is not +HHMM or -HHMM")
    minutes = int(match[2]) * 60 + int(match[3])
    if int(match[3]) > 59:
        raise ValueError("TimezoneOffsetFromUTC: is not +HHMM or -HHMM")
    minutes = -minutes if match[1] == "-" else minutes
    if not -12 * 60 <= minutes <= 14 * 60:
        raise ValueError("TimezoneOffsetFromUTC: out of range (-1200..+1400)")
    return timezone(timedelta(minutes=minutes))


def study_instant(
    study_date: str | None, study_time: str | None, offset: str | None, zone: ZoneInfo
) -> datetime | None:
    """``study_at`` from StudyDate, StudyTime and TimezoneOffsetFromUTC (else ``zone``), in UTC."""
    day = dicom_date(study_date, "StudyDate")
    moment = dicom_time(study_time)
    tz = utc_offset(offset)
    if day is None:
        return None
    local = datetime.combine(day, moment or time(0))
    return local.replace(tzinfo=tz or zone).astimezone(UTC)


def subject_key(item: dict[str, Any]) -> str | None:
    """``PatientID``, or ``IssuerOfPatientID\\PatientID`` when the issuer is present."""
    patient_id = text(item, "00100020", "PatientID")
    if patient_id is None:
        return None
    issuer = text(item, "00100021", "IssuerOfPatientID")
    return f"{issuer}\\{patient_id}" if issuer else patient_id


def study_rank(item: dict[str, Any], zone: ZoneInfo) -> str | None:
    """How a study ranks as the source of its patient's attributes (greater wins); None: it cannot take part."""
    try:
        key = subject_key(item)
        study_uid = uid(item, "0020000D", "StudyInstanceUID")
        at = study_instant(
            text(item, "00080020", "StudyDate"),
            text(item, "00080030", "StudyTime"),
            text(item, "00080201", "TimezoneOffsetFromUTC"),
            zone,
        )
    except ValueError:
        return None
    if key is None or study_uid is None:
        return None
    # Undated studies rank first ("0"); ISO UTC instants of one width sort as text.
    return ("1" + at.strftime("%Y-%m-%dT%H:%M:%S.%f") if at else "0") + "|" + study_uid


def _version(item: dict[str, Any]) -> datetime | None:
    note = item.get(ANNOTATION)
    if not isinstance(note, dict) or not isinstance(note.get("version"), str):
        return None
    try:
        when = datetime.fromisoformat(note["version"])
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _refuse_missing(fields: dict[str, object]) -> None:
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise ValueError(f"required attribute missing or empty: {', '.join(missing)}")


class DicomwebRecordParser:
    """Validates and maps one ``dicomweb`` source's DICOM JSON items (``RecordParser``)."""

    def __init__(self, mapping: Mapping, *, bucket: str, key_prefix: str, zone: ZoneInfo) -> None:
        for level, columns in MAPPED_COLUMNS.items():
            fed = {c for entry in mapping.entries(level) for c in entry.columns}
            missing = [c for c in columns if c not in fed]
            if missing:
                raise MappingError(
                    f"{mapping.path or 'the mapping'}: {level} has no entry feeding {', '.join(missing)}"
                )
            unknown = [e.field for e in mapping.entries(level) if e.field not in MAPPED[level]]
            if unknown:
                raise MappingError(
                    f"{mapping.path or 'the mapping'}: {level} maps {', '.join(unknown)}, which the dicomweb "
                    f"protocol does not read (it reads {', '.join(MAPPED[level]) or 'nothing'} through the mapping)"
                )
        self.mapping = mapping
        self.bucket = bucket
        self.key_prefix = key_prefix.strip("/")
        self.zone = zone

    def parse_page(self, level: str, page: RawPage) -> Iterable[StagedRecord | RecordRejected]:
        for raw in page.items:
            try:
                yield self.parse(level, raw)
            except RecordRejected as rejected:
                yield rejected

    def parse(self, level: str, raw: object) -> StagedRecord:
        if not isinstance(raw, dict):
            raise RecordRejected("record: is not a DICOM JSON object", synthetic_key(raw), None)
        version = _version(raw)
        key = self._key(level, raw) or synthetic_key(raw)
        if version is None:
            raise RecordRejected("record: has no version (not read through the dicomweb client)", key, None)
        try:
            values = self._values(level, raw)
        except (UnknownValue, ValueError) as exc:
            raise RecordRejected(str(exc), key, version) from None
        return StagedRecord(key, version, False, values)

    @staticmethod
    def _key(level: str, raw: dict[str, Any]) -> str | None:
        try:
            if level == "subject":
                return subject_key(raw)
            tag = {"study": "0020000D", "sequence": "0020000E", "instance": "00080018"}[level]
            return text(raw, tag, tag)
        except ValueError:
            return None

    def _mapped(self, level: str, raw: dict[str, Any]) -> dict[str, str | None]:
        fields = {keyword: text(raw, tag, keyword) for keyword, tag in MAPPED[level].items()}
        return self.mapping.apply(level, fields)

    def _values(self, level: str, raw: dict[str, Any]) -> tuple[Any, ...]:
        if level == "subject":
            patient_id = text(raw, "00100020", "PatientID")
            _refuse_missing({"PatientID": patient_id})
            name = patient_name(first_value(raw, "00100010"))
            mapped = self._mapped(level, raw)
            birth = dicom_date(text(raw, "00100030", "PatientBirthDate"), "PatientBirthDate")
            return (patient_id, name, mapped["sex"], birth)
        if level == "study":
            study_uid = uid(raw, "0020000D", "StudyInstanceUID")
            parent = subject_key(raw)
            _refuse_missing({"StudyInstanceUID": study_uid, "PatientID": parent})
            at = study_instant(
                text(raw, "00080020", "StudyDate"),
                text(raw, "00080030", "StudyTime"),
                text(raw, "00080201", "TimezoneOffsetFromUTC"),
                self.zone,
            )
            mapped = self._mapped(level, raw)
            accession = text(raw, "00080050", "AccessionNumber")
            description = text(raw, "00081030", "StudyDescription")
            return (parent, study_uid, accession, at, description, mapped["status"])
        if level == "sequence":
            series_uid = uid(raw, "0020000E", "SeriesInstanceUID")
            study_uid = uid(raw, "0020000D", "StudyInstanceUID")
            modality = text(raw, "00080060", "Modality")
            _refuse_missing({"SeriesInstanceUID": series_uid, "Modality": modality, "StudyInstanceUID": study_uid})
            number = integer(raw, "00200011", "SeriesNumber")
            mapped = self._mapped(level, raw)
            description = text(raw, "0008103E", "SeriesDescription")
            return (study_uid, series_uid, number, mapped["modality"], mapped["body_part"], mapped["laterality"],
                    description)  # fmt: skip
        if level == "instance":
            sop_uid = uid(raw, "00080018", "SOPInstanceUID")
            series_uid = uid(raw, "0020000E", "SeriesInstanceUID")
            study_uid = uid(raw, "0020000D", "StudyInstanceUID")
            _refuse_missing({"SOPInstanceUID": sop_uid, "SeriesInstanceUID": series_uid, "StudyInstanceUID": study_uid})
            number = integer(raw, "00200013", "InstanceNumber")
            key = self.storage_key(study_uid or "", series_uid or "", sop_uid or "")
            return (series_uid, sop_uid, number, self.bucket, key, None, CONTENT_TYPE)
        _unknown_level(level)

    def storage_key(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where the mirrored file lives in A's bucket: ``<prefix>/<study>/<series>/<sop>.dcm``."""
        return f"{self.key_prefix}/{study_uid}/{series_uid}/{sop_uid}.dcm"


def _unknown_level(level: str) -> NoReturn:
    raise ValueError(f"unknown level {level!r}")
