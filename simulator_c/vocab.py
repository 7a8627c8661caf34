"""C's codes, the awkward values C's contract allows, and the invertible uuids of simulated records.

Every per-record choice is a pure function of (seed, level, index), so a record can be generated
again at any time without storing it; a uuid encodes its (level, index), so looking one up
needs no table.
"""

from __future__ import annotations

import re

from simulator.vocab import mix, threshold

__all__ = ["mix", "threshold"]

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1

RESOURCES: tuple[str, ...] = ("participants", "visits", "acquisitions", "files")
# Field of a record that names its parent, per level (participants have none).
LINK_FIELD: tuple[str | None, ...] = (None, "participant", "visit", "acquisition")
FIELDS: dict[str, tuple[str, ...]] = {
    "participants": ("identifiers", "display_name", "sex", "dob"),
    "visits": ("participant", "study_instance_uid", "accession", "started", "label", "state"),
    "acquisitions": ("visit", "series_instance_uid", "series_no", "modality", "anatomy", "side", "notes"),
    "files": ("acquisition", "sop_instance_uid", "index", "object", "bytes", "mime", "sha256"),
}

# The contract's tables (README "Values and vocabularies"): codes today.
SEXES: tuple[str | None, ...] = ("m", "f", "m", "f", "x", "u", None)
STATES: tuple[str, ...] = ("complete",) * 6 + ("planned", "scanning", "aborted")
MODALITIES: tuple[str, ...] = ("mr", "ct", "mr", "ct", "pet", "pet_ct", "xr", "us", "mg", "nm", "other", "xr")
ANATOMIES: tuple[str | None, ...] = (
    "head", "brain", "neck", "chest", "abdomen", "pelvis", "c_spine", "t_spine", "l_spine",
    "shoulder", "knee", "hand", "foot", "breast", "whole_body", None, None,
)  # fmt: skip
SIDES: tuple[str | None, ...] = ("left", "right", "bilateral", None, None, None)
KNOWN_CODES: dict[str, frozenset[str | None]] = {
    "sex": frozenset(SEXES),
    "state": frozenset(STATES),
    "modality": frozenset(MODALITIES),
    "anatomy": frozenset(ANATOMIES),
    "side": frozenset(SIDES),
}
# Codes C may start sending before announcing them, and near misses (codes compare exactly).
UNKNOWN_CODES: dict[str, tuple[str, ...]] = {
    "sex": ("n", "M", "unknown"),
    "state": ("on_hold", "Complete", "cancelled"),
    "modality": ("MR", "oct", "spectral_ct"),
    "anatomy": ("elbow", "Knee", "wrist"),
    "side": ("Left", "both", "l"),
}

BUCKETS: tuple[str, ...] = ("c-archive-eu-1", "c-archive-eu-2")
NOT_ALLOWED_BUCKETS: tuple[str, ...] = ("c-archive-us-1", "C-ARCHIVE-EU-1", "c-archive-eu-3", "c-archive-eu-1 ")
UID_ROOT = "1.2.826.0.1.3680043.8.498."

# display_name forms that A stores (after the PN conversion of c-to-a.md), awkward on purpose.
FAMILY_NAMES: tuple[str, ...] = (
    "Tanaka", "Kim", "Lee", "Park", "Garcia", "Müller", "Nguyen", "Smith", "Choi", "Dubois",
    "de la Cruz", "O'Brien", "Rossi", "Sato", "Jung", "Kowalski", "Silva", "Novák", "김", "田中",
)  # fmt: skip
GIVEN_NAMES: tuple[str, ...] = (
    "Yui", "Minjun", "Seo-yeon", "Maria", "José", "Zoë", "Wei", "Ana María", "Jiho", "Lukas",
    "Émile", "Aiko", "Ken", "Hana", "John, Jr.", "Ingrid", "민준", "由衣", "Mary=Ann", "Liam",
)  # fmt: skip
# (template, family, given) -> display_name; "{f}"/"{g}" are replaced. All store without a hold-back.
NAME_FORMS: tuple[str, ...] = (
    "{f}, {g}",
    "  {f} ,{g} ",
    "{f}",
    "{f},",
    "{f}, ",
    ", {g}",
    ",{g}",
    "{f}^X, {g}",
    "O^{f}, {g}=Ann",
    "\u3000{f},\u00a0{g}\u2003",
    "\t{f}\n, {g}\r",
    "{f}, {g}, Jr.",
    "",
    "   ",
    ",",
    " , ",
)
AWKWARD_TEXT: tuple[str, ...] = (
    "O'Brien",
    'the "quoted" one',
    "tab\there",
    "line one\nline two",
    "back\\slash \\N \\t",
    "김민준 무릎 MRI",
    "膝 MRI 経過観察",
    "scan 🩻 ok",
    "%s %d {0} ${x}",
    "comma, semi; pipe|",
    "   padded   ",
    "",
    "null",
)
LABELS: tuple[str, ...] = (
    "Knee MRI, KNEE-OA follow-up 2", "Brain MRI baseline", "CT chest low dose", "PET/CT whole body",
    "Screening mammography", "Lumbar spine MRI", "Hand XR", "Abdominal US", "뇌 MRI", "頭部 MRI",
)  # fmt: skip
NOTES: tuple[str, ...] = (
    "PD FS sagittal", "T1 AX", "T2 SAG", "FLAIR AX", "DWI b1000", "AXIAL 5mm", "SCOUT", "3D MPRAGE",
    "Localizer", "T1 POST GD",
)  # fmt: skip
COHORTS: tuple[str, ...] = ("cohort:KNEE-OA", "cohort:BRAIN-AGE", "study:LUNG-SCREEN", "biobank:EU")
OFFSETS: tuple[tuple[int, str], ...] = (
    (9 * 60, "+09:00"),
    (0, "Z"),
    (60, "+01:00"),
    (-5 * 60, "-05:00"),
    (0, "+00:00"),
    (5 * 60 + 30, "+05:30"),
    (-(3 * 60 + 30), "-03:30"),
    (120, "+02:00"),
)

# ---------------------------------------------------------------------- uuids
#
# A uuid is 128 bits: the low 64 are a keyed Feistel permutation of (level << 44 | index), the
# high 64 a keyed hash of those with the version nibble 4. Distinct records get distinct uuids
# that look random (so uuid order is not index order), and a uuid decodes back to its record.

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
INDEX_BITS = 44


def is_uuid(text: object) -> bool:
    """Lower-case UUID text, 36 characters (the contract's Uuid)."""
    return isinstance(text, str) and _UUID_RE.match(text) is not None


class UuidCodec:
    """uuids of one seed: ``encode(level, idx)`` and its inverse ``decode(uuid)``."""

    def __init__(self, seed: int) -> None:
        self._keys = tuple(mix(seed * 0x100000001B3 + r * 0x9E37 + 0xC0FFEE) & M32 for r in range(4))
        self._check = mix(seed ^ 0xC5E0C5E0)

    def _permute(self, x: int) -> int:
        # A Feistel network is a bijection whatever its round function: a cheap one will do.
        left, right = x >> 32, x & M32
        for k in self._keys:
            left, right = right, left ^ ((((right ^ k) * 0x9E3779B1) & M32) ^ (right >> 13))
        return (left << 32) | right

    def _unpermute(self, y: int) -> int:
        left, right = y >> 32, y & M32
        for k in reversed(self._keys):
            left, right = right ^ ((((left ^ k) * 0x9E3779B1) & M32) ^ (left >> 13)), left
        return (left << 32) | right

    def _high(self, low: int) -> int:
        return (mix(low ^ self._check) & ~(0xF << 12)) | (0x4 << 12)

    def encode(self, level: int, idx: int) -> str:
        low = self._permute((level << INDEX_BITS) | idx)
        h = f"{self._high(low):016x}{low:016x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def decode(self, text: object) -> tuple[int, int] | None:
        """(level, index) of a uuid this codec made, else None (never raises)."""
        if not is_uuid(text):
            return None
        assert isinstance(text, str)
        h = text.replace("-", "")
        high, low = int(h[:16], 16), int(h[16:], 16)
        if self._high(low) != high:
            return None
        x = self._unpermute(low)
        level, idx = x >> INDEX_BITS, x & ((1 << INDEX_BITS) - 1)
        if level > 3:
            return None
        return level, idx


def make_uid(level: int, idx: int) -> str:
    """DICOM UID of a visit (1), acquisition (2) or file (3)."""
    return f"{UID_ROOT}{level}{idx + 1:012d}"
