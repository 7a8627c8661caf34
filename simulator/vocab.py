"""B's vocabularies, the deliberately awkward text, and the seeded hash every choice derives from.

Every per-record choice is a pure function of (seed, level, index), so a record can be
generated again at any time without storing it.
"""

from __future__ import annotations

import re

MASK64 = (1 << 64) - 1
FRAC_ONE = 1 << 32  # fractions are compared against the low 32 bits of a hash


def mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def threshold(fraction: float) -> int:
    """Integer threshold so that ``(h & 0xFFFFFFFF) < threshold(f)`` holds for a fraction f of hashes."""
    return max(0, min(FRAC_ONE, round(fraction * FRAC_ONE)))


RESOURCES: tuple[str, ...] = ("patients", "studies", "series", "images")
PREFIXES: tuple[str, ...] = ("pat", "stu", "ser", "img")
ID_DIGITS = 12
UID_ROOT = "1.2.826.0.1.3680043.8.498."
# UIDs are UID_ROOT + <level digit> + <index + 1, 12 digits>: unique across levels and never
# starting with 0 (DICOM forbids leading zeros in a UID component).
UID_LEVEL_DIGIT: tuple[str, ...] = ("1", "2", "3", "4")

_ID_RE = re.compile(r"^(pat|stu|ser|img)_(\d{12})$")
_UID_RE = re.compile(r"^" + re.escape(UID_ROOT) + r"([1-4])(\d{12})$")


def make_id(level: int, idx: int) -> str:
    """B's id of record ``idx`` of ``level`` (0 patients .. 3 images)."""
    return f"{PREFIXES[level]}_{idx:012d}"


def parse_id(rid: str) -> tuple[int, int] | None:
    """(level, index) of an id this simulator made, else None."""
    m = _ID_RE.match(rid)
    if m is None:
        return None
    return PREFIXES.index(m.group(1)), int(m.group(2))


def make_uid(level: int, idx: int) -> str:
    """DICOM UID of record ``idx`` of ``level`` (studies 1, series 2, images 3 have UIDs)."""
    return f"{UID_ROOT}{UID_LEVEL_DIGIT[level]}{idx + 1:012d}"


def parse_uid(uid: str) -> tuple[int, int] | None:
    """(level, index) of a UID this simulator made, else None."""
    m = _UID_RE.match(uid)
    if m is None:
        return None
    return UID_LEVEL_DIGIT.index(m.group(1)), int(m.group(2)) - 1


GENDERS: tuple[str | None, ...] = ("MALE", "FEMALE", "MALE", "FEMALE", "OTHER", "UNKNOWN", None)
STATUSES: tuple[str, ...] = ("COMPLETED",) * 7 + ("IN_PROGRESS", "ORDERED", "ORDERED", "CANCELLED")
MODALITIES: tuple[str, ...] = (
    "MRI", "CT", "PET", "XRAY", "ULTRASOUND", "MAMMOGRAPHY", "NUCLEAR", "FLUOROSCOPY", "ANGIOGRAPHY", "OTHER",
    "MRI", "CT", "XRAY",
)  # fmt: skip
BODY_PARTS: tuple[str | None, ...] = (
    "HEAD", "BRAIN", "NECK", "CHEST", "ABDOMEN", "PELVIS", "SPINE_CERVICAL", "SPINE_THORACIC",
    "SPINE_LUMBAR", "SHOULDER_LEFT", "SHOULDER_RIGHT", "KNEE_LEFT", "KNEE_RIGHT", "HAND_LEFT",
    "HAND_RIGHT", "FOOT_LEFT", "FOOT_RIGHT", "BREAST_LEFT", "BREAST_RIGHT", "BREAST_BOTH", "WHOLE_BODY",
    None, None,
)  # fmt: skip

KNOWN: dict[str, frozenset[str | None]] = {
    "gender": frozenset(GENDERS),
    "status": frozenset(STATUSES),
    "modality": frozenset(MODALITIES),
    "body_part": frozenset(BODY_PARTS),
}

# Values B may add without notice; the sync must hold such records back.
UNKNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "gender": ("NONBINARY", "INTERSEX"),
    "status": ("ON_HOLD", "SCHEDULED"),
    "modality": ("SPECTRAL_CT", "OCT", "mri"),
    "body_part": ("ELBOW_LEFT", "WRIST_RIGHT", "knee_left"),
}
UNKNOWN_ENUM_FIELD: tuple[str, ...] = ("gender", "status", "modality", "")  # per level; images have none

FAMILY_NAMES: tuple[str, ...] = (
    "Smith", "Kim", "Lee", "Park", "Garcia", "Müller", "Nguyen", "Johnson", "Choi", "Dubois",
    "Rossi", "Tanaka", "Jung", "Kowalski", "Silva", "Novák", "Yoon", "Andersson", "Brown", "Han",
)  # fmt: skip
GIVEN_NAMES: tuple[str, ...] = (
    "James", "Minjun", "Seo-yeon", "Maria", "José", "Zoë", "Wei", "Olivia", "Jiho", "Lukas",
    "Émile", "Aiko", "Noah", "Hana", "Mateo", "Ingrid", "Ji-woo", "Fatima", "Liam", "Soo-ah",
)  # fmt: skip
STUDY_DESCRIPTIONS: tuple[str, ...] = (
    "MRI BRAIN W/O CONTRAST", "CT CHEST W/ CONTRAST", "XR CHEST PA/LAT", "US ABDOMEN COMPLETE",
    "MRI KNEE LEFT", "PET/CT WHOLE BODY", "MAMMO SCREENING BILATERAL", "CT HEAD NON-CON",
    "MRI L-SPINE", "NM BONE SCAN", "Follow-up", "뇌 MRI 조영제 없음",
)  # fmt: skip
SERIES_DESCRIPTIONS: tuple[str, ...] = (
    "T1 AX", "T2 SAG", "FLAIR AX", "DWI b1000", "AXIAL 5mm", "CORONAL REFORMAT", "SCOUT",
    "PA", "LATERAL", "T1 POST GD", "3D MPRAGE", "Localizer",
)  # fmt: skip

# Text that breaks naive CSV/COPY/JSON/shell handling. Every character here must reach A
# exactly as sent (only NUL is special: PostgreSQL cannot store it).
AWKWARD: tuple[str, ...] = (
    "O'Brien",
    'the "quoted" one',
    "tab\there",
    "line one\nline two",
    "carriage\r\nreturn",
    "back\\slash \\N \\t",
    "김민준",
    "이서연^박",
    "Zoë Ærøskøbing-Łódź",
    "café naïve e\u0301",
    "scan 🩻 ok 😀",
    "Smith^Jr",
    "A=B^C",
    "\u2028line-sep\u2029para-sep",
    "مرحبا",
    "%s %d {0} ${x}",
    "comma, semi; pipe|",
    "<b>&amp;</b>",
    "   padded   ",
    "null",
)
_LONG_UNIT = 'Long report line with ünïcödé, 한국어, tabs\tand "quotes" and \\backslashes\\.\n'


def long_text(variant: int) -> str:
    """A description of 10,000+ characters (a few distinct ones, cached)."""
    text = _long_cache.get(variant % 4)
    if text is None:
        text = f"[long #{variant % 4}] " + _LONG_UNIT * (130 + 7 * (variant % 4))
        _long_cache[variant % 4] = text
    return text


_long_cache: dict[int, str] = {}
