"""What a simulated B holds (``SimConfig``) and how it misbehaves (``FaultConfig``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# Defect kinds per resource that A must hold back (see shared/contracts/b-to-a.md).
DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "patients": ("missing_mrn", "empty_mrn", "bad_birth_date", "wrong_type"),
    "studies": ("missing_study_uid", "missing_status", "missing_patient_id", "bad_performed_at", "wrong_type"),
    "series": ("missing_series_uid", "missing_modality", "missing_study_id", "wrong_type"),
    "images": (
        "missing_sop_uid",
        "missing_series_uid",
        "missing_file_path",
        "relative_file_path",
        "double_slash_file_path",
        "dotdot_file_path",
        "dot_file_path",
        "wrong_type",
    ),
}
UNKNOWN_ENUM_KINDS: dict[str, tuple[str, ...]] = {
    "patients": ("unknown_gender",),
    "studies": ("unknown_status",),
    "series": ("unknown_modality", "unknown_body_part"),
    "images": (),
}


@dataclass(frozen=True)
class SimConfig:
    """Shape and character of the simulated catalogue. Same config (seed included) -> same data.

    Sizes: ``patients`` x ``studies_per_patient`` x ``series_per_study`` x ``images_per_series``.
    Base records are never stored; they are computed from their index on demand.

    Time: base ``updated_at`` values lie in ``[base_time - history_seconds, base_time)``, each
    level's monotone in its index, and a child's never earlier than its parent's (unless
    ``orphan_fraction`` says otherwise). ``clock="real"``: now is wall time and ``base_time``
    defaults to the moment of construction. ``clock="manual"``: now starts at ``base_time``
    (default 2026-03-01T00:00:00Z) and moves only by ``advance``/``set_now``.

    Fractions are of records of a level, chosen by hash of the seed, so deterministic.
    """

    seed: int = 0
    patients: int = 10
    studies_per_patient: int = 2
    series_per_study: int = 2
    images_per_series: int = 3
    base_time: datetime | str | None = None
    clock: Literal["real", "manual"] = "real"
    history_seconds: float = 30 * 86400
    cursor_ttl_seconds: float = 3600.0
    """Age (by the simulator's clock) after which a cursor is answered 400 cursor_expired."""

    shared_timestamp_fraction: float = 0.1
    """Fraction of blocks of ``shared_group_size`` consecutive records that share one instant."""
    shared_group_size: int = 4
    whole_second_fraction: float = 0.2
    """Fraction of instants that are whole seconds (written without a fraction)."""
    millisecond_fraction: float = 0.2

    awkward_text_fraction: float = 0.05
    """Names/descriptions carrying quotes, tabs, newlines, backslashes, Korean, emoji, ``^``, ``=``."""
    long_text_fraction: float = 0.002
    """Descriptions of 10,000+ characters."""
    nul_fraction: float = 0.002
    """Text containing a NUL character (A stores it with the NUL removed)."""
    null_fraction: float = 0.05
    """Optional fields null or missing (name parts, birth_date, accession_no, body_part, ...)."""

    unknown_enum_fraction: float = 0.0
    """Records with an enum value not in B's documented vocabulary (A must hold them back)."""
    invalid_fraction: float = 0.0
    """Records with a defect from ``DEFECT_KINDS`` (A must hold them back)."""
    invalid_kinds: tuple[str, ...] | None = None
    """Restrict ``invalid_fraction`` to these kinds (kinds not valid for a resource are ignored)."""
    defects: Mapping[str, str] = field(default_factory=dict)
    """Explicit base-record defects: id -> kind from DEFECT_KINDS or UNKNOWN_ENUM_KINDS."""
    orphan_fraction: float = 0.0
    """Fraction of patients, studies and series whose base ``updated_at`` is moved
    ``orphan_delay_seconds`` later (capped below ``base_time``), so their children fall in an
    earlier window than they do."""
    orphan_delay_seconds: float = 86400.0
    tombstone_style: Literal["absent", "null"] = "absent"
    """Tombstones carry only id/updated_at/deleted ("absent") or every field as null ("null")."""

    def __post_init__(self) -> None:
        for name in ("patients", "studies_per_patient", "series_per_study", "images_per_series"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.clock not in ("real", "manual"):
            raise ValueError("clock must be 'real' or 'manual'")
        if self.shared_group_size < 1:
            raise ValueError("shared_group_size must be >= 1")
        if self.history_seconds <= 0:
            raise ValueError("history_seconds must be > 0")
        if self.patients * self.studies_per_patient * self.series_per_study * self.images_per_series >= 10**12:
            raise ValueError("at most 10**12 images")
        known = {k for kinds in (*DEFECT_KINDS.values(), *UNKNOWN_ENUM_KINDS.values()) for k in kinds}
        bad = {k for k in (self.invalid_kinds or ()) if k not in known} | {
            k for k in self.defects.values() if k not in known
        }
        if bad:
            raise ValueError(f"unknown defect kinds: {sorted(bad)}")
        prefixes = {"pat": "patients", "stu": "studies", "ser": "series", "img": "images"}
        for rid, kind in self.defects.items():
            resource = prefixes.get(rid[:3])
            if resource is None or kind not in DEFECT_KINDS[resource] + UNKNOWN_ENUM_KINDS[resource]:
                raise ValueError(f"defect {kind!r} does not apply to {rid!r}")

    @property
    def total_images(self) -> int:
        """Number of base images."""
        return self.patients * self.studies_per_patient * self.series_per_study * self.images_per_series

    @classmethod
    def plain(cls, **overrides: Any) -> SimConfig:
        """A config without awkward text, NULs, long text or nulls: easy row-by-row comparisons."""
        base: dict[str, Any] = {
            "awkward_text_fraction": 0.0,
            "long_text_fraction": 0.0,
            "nul_fraction": 0.0,
            "null_fraction": 0.0,
        }
        base.update(overrides)
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        """JSON-able view (for the admin ``config`` endpoint)."""
        out = dataclasses.asdict(self)
        out["defects"] = dict(self.defects)
        out["base_time"] = self.base_time.isoformat() if isinstance(self.base_time, datetime) else self.base_time
        return out


DROP_MODES = ("close", "reset", "mid_body")


@dataclass(frozen=True)
class FaultConfig:
    """Faults the HTTP API injects; all off by default. Changeable at run time.

    ``*_every = k`` hits every k-th API request (counted from 1, after authentication);
    ``*_fraction`` hits a deterministic pseudo-random fraction of requests (by request number).
    When several faults pick the same request, precedence is drop, error, throttle, slow;
    cursor expiry is counted over requests that carry a cursor. ``max_faults`` caps the total
    injected (rate limiting not included) so a test cannot loop forever.
    """

    throttle_every: int = 0
    throttle_fraction: float = 0.0
    retry_after: int = 1
    """Seconds sent in Retry-After with injected 429s."""
    error_every: int = 0
    error_fraction: float = 0.0
    error_status: int = 503
    drop_every: int = 0
    drop_fraction: float = 0.0
    drop_mode: str = "close"
    """close: FIN before any response; reset: RST; mid_body: headers and half the body, then close."""
    slow_every: int = 0
    slow_fraction: float = 0.0
    slow_seconds: float = 1.0
    expire_every: int = 0
    expire_fraction: float = 0.0
    rate_limit_per_second: float | None = None
    """Token bucket per API key (burst = max(1, rate)); excess -> 429 with Retry-After."""
    revoke_key_after: int = 0
    """After this many API requests the key is refused (401), as if revoked mid-run; 0: never."""
    max_faults: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode must be one of {DROP_MODES}")
        if not 500 <= self.error_status <= 599:
            raise ValueError("error_status must be 5xx")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.revoke_key_after < 0:
            raise ValueError("revoke_key_after must be >= 0")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second <= 0:
            raise ValueError("rate_limit_per_second must be > 0 (or None for no limit)")

    def to_json(self) -> dict[str, Any]:
        """JSON-able view."""
        return dataclasses.asdict(self)
