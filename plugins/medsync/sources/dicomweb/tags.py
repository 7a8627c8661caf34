"""The DICOM attributes the ``dicomweb`` protocol reads per level (tag, keyword), as in docs/dicomweb-mapping.md.

The QIDO-RS queries ask for exactly these (``includefield``); the record's version is the hash of
exactly these values (``medsync.sources.dicomweb.versions``).
"""

from __future__ import annotations

PATIENT: dict[str, str] = {
    "00100020": "PatientID",
    "00100021": "IssuerOfPatientID",
    "00100010": "PatientName",
    "00100040": "PatientSex",
    "00100030": "PatientBirthDate",
}
STUDY: dict[str, str] = {
    "0020000D": "StudyInstanceUID",
    "00080050": "AccessionNumber",
    "00080020": "StudyDate",
    "00080030": "StudyTime",
    "00080201": "TimezoneOffsetFromUTC",
    "00081030": "StudyDescription",
    "0032000A": "StudyStatusID",
}
SERIES: dict[str, str] = {
    "0020000D": "StudyInstanceUID",
    "0020000E": "SeriesInstanceUID",
    "00200011": "SeriesNumber",
    "00080060": "Modality",
    "00180015": "BodyPartExamined",
    "00200060": "Laterality",
    "0008103E": "SeriesDescription",
}
INSTANCE: dict[str, str] = {
    "0020000D": "StudyInstanceUID",
    "0020000E": "SeriesInstanceUID",
    "00080018": "SOPInstanceUID",
    "00200013": "InstanceNumber",
}

READ: dict[str, dict[str, str]] = {
    "subject": PATIENT,
    "study": {**PATIENT, **STUDY},
    "sequence": SERIES,
    "instance": INSTANCE,
}
"""Per level, what a record of it is made from (a subject from its studies' patient attributes)."""

QIDO_RESOURCE: dict[str, str] = {
    "subject": "studies",
    "study": "studies",
    "sequence": "series",
    "instance": "instances",
}
KEYWORD_TAG: dict[str, str] = {k: t for level in READ.values() for t, k in level.items()}
