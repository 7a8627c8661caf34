"""Synthetic DICOM for tests and the demo, made with pydicom: deterministic for a given seed.

Patients -> studies -> series -> instances with the variety a hospital PACS has: several
modalities and body parts, optional tags missing, ``PatientName`` in Latin letters, Korean and
Japanese (Alphabetic, Ideographic and Phonetic groups, some with the Ideographic group only),
``TimezoneOffsetFromUTC`` on some studies, patients with an ``IssuerOfPatientID``. Every file is
UTF-8 (``ISO_IR 192``). A tiny 8x8 picture keeps each file small (about 1 KB).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
"""pydicom's own UID root, for synthetic data."""

MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "RF", "XA", "OT")
BODY_PARTS = ("HEAD", "BRAIN", "NECK", "CHEST", "ABDOMEN", "PELVIS", "CSPINE", "LSPINE", "KNEE", "HAND", "BREAST", None)
PAIRED = {"KNEE", "HAND", "BREAST", "SHOULDER", "FOOT"}
NAMES = (
    "Doe^John",
    "Smith^Anne^Marie^Dr.^PhD",
    "O'Brien^Seán",
    "Hong^Gildong=洪^吉洞=홍^길동",
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "=김^민준",  # Korean written only in the Ideographic group
    "=李^",  # family name only, Ideographic only
    "Kim^Minjun=金^敏俊",
    "^Cher",
    None,
)


@dataclass(frozen=True)
class InstanceSpec:
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str


@dataclass
class Catalogue:
    """What was generated: UIDs per level, to check A against."""

    patients: set[str] = field(default_factory=set)
    studies: dict[str, str] = field(default_factory=dict)
    """study UID -> subject key."""
    series: dict[str, str] = field(default_factory=dict)
    """series UID -> study UID."""
    instances: dict[str, str] = field(default_factory=dict)
    """SOP UID -> series UID."""
    modalities: dict[str, str] = field(default_factory=dict)
    """series UID -> modality."""


def uid(seed: int, *parts: object) -> str:
    # pydicom joins the sources without a separator: (1, 12) and (11, 2) would be one UID.
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["/".join(map(str, (seed, *parts)))])


def dataset_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_instance(
    *,
    patient: dict[str, object],
    study: dict[str, object],
    series: dict[str, object],
    sop_uid: str,
    number: int,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    for dataset_part in (patient, study, series):
        for keyword, value in dataset_part.items():
            if value is not None:
                setattr(ds, keyword, value)
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((number * 7 + i) % 256 for i in range(64))
    return ds


def generate(  # noqa: PLR0917 - every knob has a default; tests name the ones they change
    seed: int = 7,
    patients: int = 20,
    studies_per_patient: tuple[int, int] = (1, 3),
    series_per_study: tuple[int, int] = (1, 3),
    instances_per_series: tuple[int, int] = (1, 12),
    catalogue: Catalogue | None = None,
    extra_modalities: tuple[str, ...] = (),
) -> Iterator[bytes]:
    """Yields the files (bytes) of a synthetic PACS; fills ``catalogue`` with what it made.

    ``extra_modalities`` are used for a few series (e.g. a modality the mapping does not know).
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    cat = catalogue if catalogue is not None else Catalogue()
    base = date(2024, 1, 1)
    for p in range(patients):
        issuer = "HOSP_A" if p % 4 == 1 else None
        patient_id = f"P{seed:02d}{p:05d}"
        key = f"{issuer}\\{patient_id}" if issuer else patient_id
        cat.patients.add(key)
        name = NAMES[p % len(NAMES)]
        sex = ("M", "F", "O", None)[p % 4]
        birth = (base - timedelta(days=365 * 30 + p * 97)).strftime("%Y%m%d") if p % 5 else None
        patient = {
            "PatientID": patient_id,
            "IssuerOfPatientID": issuer,
            "PatientName": name,
            "PatientSex": sex,
            "PatientBirthDate": birth,
        }
        for s in range(rng.randint(*studies_per_patient)):
            study_uid = uid(seed, p, s)
            cat.studies[study_uid] = key
            when = datetime(2024, 1, 1, 8, 0) + timedelta(days=rng.randint(0, 700), minutes=rng.randint(0, 600))
            study = {
                "StudyInstanceUID": study_uid,
                "StudyDate": when.strftime("%Y%m%d") if (p + s) % 9 else None,
                "StudyTime": when.strftime("%H%M%S") if (p + s) % 7 else None,
                "TimezoneOffsetFromUTC": ("+0900", "-0500", None, None)[(p + s) % 4],
                "AccessionNumber": f"ACC{seed}{p:05d}{s}" if (p + s) % 6 else None,
                "StudyDescription": f"Study {s} of patient {p}" if s % 2 == 0 else None,
                "StudyID": str(s + 1),
                "ReferringPhysicianName": "",
            }
            for r in range(rng.randint(*series_per_study)):
                series_uid = uid(seed, p, s, r)
                cat.series[series_uid] = study_uid
                use_extra = extra_modalities and (p * 31 + s * 7 + r) % 17 == 3
                modality = extra_modalities[(p + r) % len(extra_modalities)] if use_extra else rng.choice(MODALITIES)
                cat.modalities[series_uid] = modality
                body = rng.choice(BODY_PARTS)
                series = {
                    "SeriesInstanceUID": series_uid,
                    "Modality": modality,
                    "SeriesNumber": r + 1 if r % 5 != 4 else None,
                    "BodyPartExamined": body,
                    "Laterality": rng.choice(("L", "R")) if body in PAIRED else None,
                    "SeriesDescription": f"{modality} series {r}" if r % 3 else None,
                }
                for i in range(rng.randint(*instances_per_series)):
                    sop_uid = uid(seed, p, s, r, i)
                    cat.instances[sop_uid] = series_uid
                    yield dataset_bytes(
                        make_instance(patient=patient, study=study, series=series, sop_uid=sop_uid, number=i + 1)
                    )
