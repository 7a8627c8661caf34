"""What a simulated C holds (``SimConfig``) and how it misbehaves (``FaultConfig``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from simulator_c.vocab import RESOURCES

# Defects that make A hold a record back (shared/contracts/c-to-a.md, "Records that cannot be
# stored as they are"), per resource. Every served record still matches openapi.yaml.
DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "participants": ("empty_mrn", "bad_dob", "unknown_sex"),
    "visits": ("empty_study_uid", "bad_started", "unknown_state"),
    "acquisitions": ("empty_series_uid", "bad_series_no", "unknown_modality", "unknown_anatomy", "unknown_side"),
    "files": (
        "empty_sop_uid",
        "bad_key",
        "bucket_not_allowed",
        "empty_bucket",
        "index_out_of_range",
        "bytes_out_of_range",
    ),
}
# Defects that also break openapi.yaml (C says it checks structure, so these "cannot happen";
# c-to-a.md still lists them). Only injected when named in ``invalid_kinds`` or ``defects``
# or by ``make_invalid``.
SCHEMA_DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "participants": ("wrong_type",),
    "visits": ("wrong_type", "bad_link"),
    "acquisitions": ("wrong_type", "bad_link"),
    "files": ("wrong_type", "bad_link"),
}


def kinds_of(resource: str) -> tuple[str, ...]:
    """Every defect kind of a resource (conforming first)."""
    return DEFECT_KINDS[resource] + SCHEMA_DEFECT_KINDS[resource]


@dataclass(frozen=True)
class SimConfig:
    """Shape and character of the simulated catalogue. Same config (seed included) -> same data.

    Sizes: ``participants`` x ``visits_per_participant`` x ``acquisitions_per_visit`` x
    ``files_per_acquisition``. Base records are never stored; they are computed on demand.

    Time: base ``modified`` values (epoch ms) lie in ``[base_time - history_seconds, base_time)``,
    each level's monotone in its index, a child's never earlier than its parent's. ``clock="real"``:
    now is wall time and ``base_time`` defaults to the moment of construction. ``clock="manual"``:
    now starts at ``base_time`` (default 2026-11-03T00:00:00Z) and moves only by
    ``advance``/``set_now`` (or when a change needs a later millisecond than now).

    Fractions are of records of a level, chosen by a hash of the seed, so deterministic.
    """

    seed: int = 0
    participants: int = 10
    visits_per_participant: int = 2
    acquisitions_per_visit: int = 2
    files_per_acquisition: int = 3
    base_time: datetime | str | None = None
    clock: Literal["real", "manual"] = "real"
    history_seconds: float = 30 * 86400
    snapshot_ttl_seconds: float = 15 * 60
    """A snapshot lives this long (simulator clock) from the response that pinned it; then 410."""
    max_snapshots: int = 20_000
    """Snapshots kept at most (the oldest is forgotten first: 410 as if never issued)."""
    commit_delay_seconds: float = 0.0
    """A change is visible (lists, record endpoint, deletions, /stats) only this long after its
    ``modified``/``deleted`` (C's "visible once its commit completes"); keep it <= 30."""

    shared_modified_fraction: float = 0.2
    """Fraction of blocks of ``shared_group_size`` consecutive records that share one ``modified``."""
    shared_group_size: int = 4
    awkward_fraction: float = 0.1
    """Names in awkward forms (commas, ``^``, ``=``, Unicode white space, empty...) and awkward
    free text (quotes, tabs, newlines, backslashes, Korean, Japanese, emoji)."""
    null_fraction: float = 0.1
    """Nullable fields null (display_name, sex, dob, accession, started, label, series_no, ...)."""
    nul_fraction: float = 0.002
    """Free text containing a NUL character (A stores it with the NUL removed)."""
    second_bucket_fraction: float = 0.5
    """Files stored in ``c-archive-eu-2`` rather than ``c-archive-eu-1`` (per file, so mixed
    within an acquisition)."""

    late_parent_fraction: float = 0.0
    """Fraction of participants, visits and acquisitions changed once more late in the history
    (``late_parent_delay_seconds`` after their first ``modified``, capped below ``base_time``),
    so that their children lie in earlier windows than they do (C's lists are independent)."""
    late_parent_delay_seconds: float = 86400.0
    deleted_fraction: float = 0.0
    """Fraction of the records of every resource deleted during the history (one deletion item
    each, before ``base_time``; children stay live, pointing at a deleted parent). These and
    the late parents are stored as changes, so they cost memory per record."""

    invalid_fraction: float = 0.0
    """Records with a defect A must hold back (``DEFECT_KINDS``)."""
    invalid_kinds: tuple[str, ...] | None = None
    """Kinds ``invalid_fraction`` picks from (default: every ``DEFECT_KINDS`` kind; name
    ``SCHEMA_DEFECT_KINDS`` kinds here to get those too). Kinds not of a resource are ignored."""
    defects: Mapping[str, str] = field(default_factory=dict)
    """Explicit base-record defects: ``"files:12"`` (resource:index) -> kind."""

    def __post_init__(self) -> None:
        for name in ("participants", "visits_per_participant", "acquisitions_per_visit", "files_per_acquisition"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.clock not in ("real", "manual"):
            raise ValueError("clock must be 'real' or 'manual'")
        if self.shared_group_size < 1:
            raise ValueError("shared_group_size must be >= 1")
        if self.history_seconds <= 0:
            raise ValueError("history_seconds must be > 0")
        if self.snapshot_ttl_seconds <= 0 or self.max_snapshots < 1:
            raise ValueError("snapshot_ttl_seconds must be > 0 and max_snapshots >= 1")
        if self.commit_delay_seconds < 0:
            raise ValueError("commit_delay_seconds must be >= 0")
        for name in ("late_parent_fraction", "deleted_fraction", "invalid_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.total_files >= 1 << 40:
            raise ValueError("at most 2**40 files")
        known = {k for r in RESOURCES for k in kinds_of(r)}
        bad = {k for k in (self.invalid_kinds or ()) if k not in known}
        if bad:
            raise ValueError(f"unknown defect kinds: {sorted(bad)}")
        for ref, kind in self.defects.items():
            resource, _, idx = ref.partition(":")
            if resource not in RESOURCES or not idx.isdigit() or kind not in kinds_of(resource):
                raise ValueError(f"defect {kind!r} does not apply to {ref!r} (write 'files:12')")

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """Base records per level."""
        p = self.participants
        v = p * self.visits_per_participant
        a = v * self.acquisitions_per_visit
        return (p, v, a, a * self.files_per_acquisition)

    @property
    def total_files(self) -> int:
        """Number of base files."""
        return self.sizes[3]

    @classmethod
    def plain(cls, **overrides: Any) -> SimConfig:
        """No awkward text, NULs or nulls: easy row-by-row comparisons."""
        base: dict[str, Any] = {"awkward_fraction": 0.0, "null_fraction": 0.0, "nul_fraction": 0.0}
        base.update(overrides)
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        """JSON-able view (for the admin ``config`` endpoint)."""
        out = dataclasses.asdict(self)
        out["defects"] = dict(self.defects)
        out["base_time"] = self.base_time.isoformat() if isinstance(self.base_time, datetime) else self.base_time
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimConfig:
        """Inverse of ``to_json`` (lists become tuples)."""
        args = dict(data)
        if args.get("invalid_kinds") is not None:
            args["invalid_kinds"] = tuple(args["invalid_kinds"])
        return cls(**args)


DROP_MODES = ("close", "reset", "mid_body")
GATEWAY_BODIES = ("html", "empty")


@dataclass(frozen=True)
class FaultConfig:
    """Faults the HTTP API injects, and C's own rate limit. Changeable at run time.

    ``*_every = k`` hits every k-th API request (counted from 1 after authentication and the
    rate limit, since the faults were set); ``*_fraction`` a deterministic pseudo-random
    fraction of requests (by request number). One request gets one fault; precedence is
    drop, gateway, internal, unavailable, throttle, slow. ``max_faults`` caps the faults
    injected (rate limiting and snapshot expiry by age not included).

    ``rate_limit`` is C's documented limit (requests per token in any one-second interval),
    on by default; ``None`` turns it off (benchmarks). ``FaultConfig()`` = no injected faults.
    """

    rate_limit: int | None = 10
    throttle_every: int = 0
    throttle_fraction: float = 0.0
    throttle_retry_after: float = 1.0
    """Seconds after the response's Date that an injected 429's Retry-After names."""
    unavailable_every: int = 0
    unavailable_fraction: float = 0.0
    unavailable_retry_after: float | None = None
    """Retry-After (seconds after Date, sent as an HTTP-date) on injected 503s; None: no header."""
    internal_every: int = 0
    internal_fraction: float = 0.0
    gateway_every: int = 0
    gateway_fraction: float = 0.0
    gateway_status: int = 502
    gateway_body: str = "html"
    """502/504 from C's load balancer: an HTML page ("html") or nothing ("empty"); never JSON."""
    drop_every: int = 0
    drop_fraction: float = 0.0
    drop_mode: str = "close"
    """close: FIN before any response; reset: RST; mid_body: headers and half a body, then close."""
    slow_every: int = 0
    slow_fraction: float = 0.0
    slow_seconds: float = 1.0
    expire_every: int = 0
    """Every k-th snapshot pinned expires after ``expire_after_pages`` pages (410 snapshot_expired)."""
    expire_after_pages: int = 1
    max_faults: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode must be one of {DROP_MODES}")
        if self.gateway_status not in (502, 504):
            raise ValueError("gateway_status must be 502 or 504")
        if self.gateway_body not in GATEWAY_BODIES:
            raise ValueError(f"gateway_body must be one of {GATEWAY_BODIES}")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise ValueError("rate_limit must be >= 1 (or None for no limit)")
        if self.expire_after_pages < 1:
            raise ValueError("expire_after_pages must be >= 1")
        if self.throttle_retry_after < 0 or (self.unavailable_retry_after or 0) < 0:
            raise ValueError("retry-after seconds must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """JSON-able view."""
        return dataclasses.asdict(self)
