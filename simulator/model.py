"""The simulated catalogue: lazily computed base records plus a small overlay of changes.

Base record ``i`` of a level is a pure function of (config, level, i); its ``updated_at`` is
monotone in ``i``, so a time window maps to an index range by binary search and nothing
is materialised up front (10,000,000 images cost no memory). Every change made later
(update, delete, undelete, new record) lives in the overlay: per level a dict id -> entry
and a list of (t_us, id) kept sorted. A base record present in the overlay is skipped at
its base position, so it is served only at its newer one.

Orphan parents (``orphan_fraction``) form a third lazy stream: every ``period``-th parent is
served ``orphan_delay_seconds`` later than its base position.

All public methods take one lock; the HTTP server calls them from many threads.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from simulator import timefmt
from simulator.config import DEFECT_KINDS, UNKNOWN_ENUM_KINDS, SimConfig
from simulator.timefmt import US_PER_S
from simulator.vocab import (
    AWKWARD,
    BODY_PARTS,
    FAMILY_NAMES,
    GENDERS,
    GIVEN_NAMES,
    MODALITIES,
    PREFIXES,
    RESOURCES,
    SERIES_DESCRIPTIONS,
    STATUSES,
    STUDY_DESCRIPTIONS,
    UID_ROOT,
    UNKNOWN_VALUES,
    long_text,
    make_id,
    make_uid,
    mix,
    parse_id,
    parse_uid,
    threshold,
)

M32 = 0xFFFFFFFF
MANUAL_DEFAULT_BASE = "2026-03-01T00:00:00Z"

FIELDS: dict[str, tuple[str, ...]] = {
    "patients": ("mrn", "name", "gender", "birth_date"),
    "studies": ("patient_id", "study_uid", "accession_no", "performed_at", "description", "status"),
    "series": ("study_id", "series_uid", "number", "modality", "body_part", "description"),
    "images": ("series_uid", "sop_uid", "number", "file_path", "file_size", "content_type"),
}
# Field of a child that names its parent, per child level (patients have none).
LINK_FIELD: tuple[str | None, ...] = (None, "patient_id", "study_id", "series_uid")

Key = tuple[int, str]


def level_of(resource: str) -> int:
    """0..3 for patients, studies, series, images; ValueError otherwise."""
    try:
        return RESOURCES.index(resource)
    except ValueError:
        raise ValueError(f"unknown resource {resource!r}; one of {RESOURCES}") from None


class _Entry:
    """Current version of a changed record. ``rec`` is exactly what the API serves."""

    __slots__ = ("cause", "created", "defect", "idx", "live", "rec", "t", "version")

    def __init__(self, idx: int, t: int, rec: dict[str, Any], live: dict[str, Any], created: int) -> None:
        self.idx = idx
        self.t = t
        self.rec = rec
        self.live = live  # last live content, so that undelete can restore it
        self.created = created
        self.cause: str | None = None  # id whose delete() produced this tombstone
        self.defect: str | None = None
        self.version = 1

    @property
    def deleted(self) -> bool:
        return bool(self.rec["deleted"])


@dataclass
class _Level:
    n: int  # base records
    per_parent: int  # base children per parent (1 for patients)
    start: int  # instant of (virtual) record 0
    span: int  # base records cover [start, start + span)
    shared_thr: int
    salt: int
    period: int  # orphan period; 0 = no orphans at this level
    residue: int


class Catalogue:
    """B's data: base records computed on demand plus an overlay of later changes.

    Resources are named ``"patients" | "studies" | "series" | "images"``. Records are plain
    JSON-able dicts shaped as B's API serves them; every dict handed out is a fresh copy.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        c = config
        self._n = (
            c.patients,
            c.patients * c.studies_per_patient,
            c.patients * c.studies_per_patient * c.series_per_study,
            c.total_images,
        )
        self._per = (1, c.studies_per_patient, c.series_per_study, c.images_per_series)
        if c.base_time is not None:
            self.base_us = timefmt.to_us(c.base_time)
        elif c.clock == "manual":
            self.base_us = timefmt.parse(MANUAL_DEFAULT_BASE)
        else:
            self.base_us = time.time_ns() // 1000 // US_PER_S * US_PER_S
        self._seed_salt = mix(c.seed * 0x1000193 + 0x5EED)
        self._ws_thr = threshold(c.whole_second_fraction)
        self._ms_thr = threshold(c.whole_second_fraction + c.millisecond_fraction)
        self._awk_thr = threshold(c.awkward_text_fraction)
        self._long_thr = threshold(c.long_text_fraction)
        self._nul_thr = threshold(c.nul_fraction)
        self._null_thr = threshold(c.null_fraction)
        self._inv_thr = threshold(c.invalid_fraction)
        self._unk_thr = threshold(c.unknown_enum_fraction)
        self._kinds = tuple(
            tuple(k for k in DEFECT_KINDS[r] if c.invalid_kinds is None or k in c.invalid_kinds) for r in RESOURCES
        )
        self._explicit = dict(c.defects)
        self._orphan_cap = self.base_us - 1
        self._orphan_delay = int(c.orphan_delay_seconds * US_PER_S)
        self._levels = self._layout()
        self._img_cache: tuple[int, int, str, str] = (-1, -1, "", "")
        self._hmac_key = hashlib.sha256(f"medsync-sim-cursor-{c.seed}".encode()).digest()
        self._reset_state()

    # ------------------------------------------------------------------ layout and time

    def _layout(self) -> list[_Level]:
        """Place each level's base instants so that a child is never earlier than its parent.

        Level L's record k sits at start_L + k*span // n_L. Children start later than their
        parents by a lag covering one parent step plus one shared-timestamp block of the
        child level, so the arithmetic can never put a child before its parent.
        """
        c = self.config
        g = c.shared_group_size
        hist = int(c.history_seconds * US_PER_S)
        n = self._n
        slack = 2 * US_PER_S
        a = sum(1 / n[lv - 1] + g / n[lv] for lv in (1, 2, 3))
        span = max(1, int((hist - 4 * slack) / (1 + a)))
        for _ in range(100):
            steps = [-(-span // n[lv]) for lv in range(4)]
            lags = [0]
            for lv in (1, 2, 3):
                lags.append(lags[-1] + steps[lv - 1] + g * steps[lv] + slack)
            if lags[3] + span < hist or span == 1:
                break
            span = max(1, int(span * 0.97))
        t0 = self.base_us - max(hist, lags[3] + span + 1)
        levels = []
        for lv in range(4):
            period = 0
            if lv < 3 and c.orphan_fraction > 0:
                period = max(1, round(1 / c.orphan_fraction))
            salt = mix(self._seed_salt ^ (lv + 1) * 0x9E3779B9)
            levels.append(
                _Level(
                    n=n[lv],
                    per_parent=self._per[lv],
                    start=t0 + lags[lv],
                    span=span,
                    shared_thr=threshold(c.shared_timestamp_fraction) if g > 1 else 0,
                    salt=salt,
                    period=period,
                    residue=(salt >> 7) % period if period else 0,
                )
            )
        return levels

    def _t(self, lv: _Level, i: int) -> int:
        """Base instant of record ``i`` (monotone non-decreasing in i)."""
        k = i
        if lv.shared_thr:
            g = self.config.shared_group_size
            b = i // g
            if mix(lv.salt ^ 0x51A7ED ^ (b << 20)) & M32 < lv.shared_thr:
                k = b * g
        raw = lv.start + k * lv.span // lv.n
        if self._ms_thr:
            hv = mix(lv.salt ^ 0x5DA9 ^ (k << 21)) & M32
            if hv < self._ms_thr:
                # Snapping up stays below the next record's raw instant, so order is kept.
                nxt = lv.start + (k + 1) * lv.span // lv.n
                if hv < self._ws_thr:
                    c = -(-raw // US_PER_S) * US_PER_S
                    if c <= nxt:
                        return c
                c = -(-raw // 1000) * 1000
                if c <= nxt:
                    return c
        return raw

    def _displaced(self, lv: _Level, i: int) -> bool:
        return lv.period > 0 and i % lv.period == lv.residue

    def _orphan_t(self, lv: _Level, i: int) -> int:
        return min(self._t(lv, i) + self._orphan_delay, self._orphan_cap)

    def _base_t(self, level: int, idx: int) -> int:
        """Instant at which base record idx is served (its orphan-shifted one if displaced)."""
        lv = self._levels[level]
        return self._orphan_t(lv, idx) if self._displaced(lv, idx) else self._t(lv, idx)

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._ov: list[dict[str, _Entry]] = [{} for _ in RESOURCES]
        self._keys: list[list[Key]] = [[] for _ in RESOURCES]
        self._next_idx = list(self._n)
        self._parent_override: list[dict[int, int]] = [{} for _ in RESOURCES]
        self._new_parent: list[dict[int, int]] = [{} for _ in RESOURCES]
        self._extra_children: list[dict[int, list[int]]] = [{} for _ in RESOURCES]  # keyed by child level
        self._live = list(self._n)
        self._clock_offset = 0
        self._manual_now = self.base_us
        self._last_now = 0

    def reset(self) -> None:
        """Forget every change and rewind the clock: the catalogue is as constructed."""
        with self._lock:
            self._reset_state()

    # ------------------------------------------------------------------ clock

    def now_us(self) -> int:
        """The simulator's now (microseconds). Never goes backwards in real mode."""
        with self._lock:
            if self.config.clock == "manual":
                return self._manual_now
            now = time.time_ns() // 1000 + self._clock_offset
            self._last_now = max(self._last_now, now)
            return self._last_now

    def advance(self, seconds: float) -> int:
        """Move the clock forward (manual: exactly; real: adds an offset to wall time)."""
        if seconds < 0:
            raise ValueError("advance() takes seconds >= 0; use set_now to go back")
        with self._lock:
            if self.config.clock == "manual":
                self._manual_now += round(seconds * US_PER_S)
            else:
                self._clock_offset += round(seconds * US_PER_S)
            return self.now_us()

    def set_now(self, value: Any) -> int:
        """Set now (datetime, RFC 3339 or epoch seconds). Going back is allowed: later versions
        still get an ``updated_at`` after their previous one."""
        t = timefmt.to_us(value)
        with self._lock:
            if self.config.clock == "manual":
                self._manual_now = t
            else:
                self._clock_offset = t - time.time_ns() // 1000
                self._last_now = 0
            return self.now_us()

    # ------------------------------------------------------------------ generation

    def _parent_of(self, level: int, idx: int) -> int:
        """Current parent index of a record (after any re-parenting update)."""
        p = self._parent_override[level].get(idx)
        if p is not None:
            return p
        return self._orig_parent(level, idx)

    def _orig_parent(self, level: int, idx: int) -> int:
        if idx < self._n[level]:
            return idx // self._per[level]
        return self._new_parent[level][idx]

    def _text(self, base: str, h: int, h2: int, allow_long: bool) -> str:
        """``base`` made awkward, long or NUL-bearing per the config fractions.

        ``allow_long=False``: only awkward (then ``h2`` is unused).
        """
        s = base
        if h & M32 < self._awk_thr:
            s = AWKWARD[(h >> 32) % len(AWKWARD)] + (" " + s if (h >> 40) & 1 else "")
        if not allow_long:
            return s
        if h2 & M32 < self._long_thr:
            s = long_text(h2 >> 36)
        if (h2 >> 32) < self._nul_thr:
            mid = len(s) // 2
            s = s[:mid] + "\x00" + s[mid:]
        return s

    def _gen(
        self,
        level: int,
        idx: int,
        t: int,
        created: int,
        *,
        number: int | None = None,
        clean: bool = False,
        style: int | None = None,
    ) -> dict[str, Any]:
        """Record ``idx`` of ``level`` with updated_at ``t``; ``created`` dates paths and procedures."""
        h = mix(self._levels[level].salt ^ idx)
        rid = f"{PREFIXES[level]}_{idx:012d}"
        if number is None:
            number = idx % self._per[level] + 1
        ts = timefmt.render(t, (h >> 24) if style is None else style)
        if level == 3:
            ser = idx // self._per[3] if idx < self._n[3] else self._new_parent[3][idx]
            day = created // (86400 * US_PER_S)
            # Consecutive images mostly share series and day: reuse the path prefix and UID.
            cached = self._img_cache
            if cached[0] != ser or cached[1] != day:
                stu = self._orig_parent(2, ser)
                d = timefmt.date_str(day)
                cached = self._img_cache = (
                    ser, day, f"/{d[0:4]}/{d[5:7]}/{d[8:10]}/{make_id(1, stu)}/{make_id(2, ser)}/", make_uid(2, ser)
                )  # fmt: skip
            rec: dict[str, Any] = {
                "id": rid,
                "series_uid": cached[3],
                "sop_uid": f"{UID_ROOT}4{idx + 1:012d}",
                "number": number,
                "file_path": f"{cached[2]}{rid}.dcm",
                "file_size": _file_size(h),
                "content_type": "application/dicom",
                "updated_at": ts,
                "deleted": False,
            }
        else:
            rec = self._gen_upper(level, idx, rid, h, ts, created, number)
        if not clean:
            kind = self._defect_for(level, idx, rid)
            if kind is not None:
                apply_defect(level, rec, kind, h)
        return rec

    def _gen_upper(self, level: int, idx: int, rid: str, h: int, ts: str, created: int, number: int) -> dict[str, Any]:
        h2 = mix(h ^ 0xA11)
        h3 = mix(h ^ 0xB22)
        h4 = mix(h ^ 0xC33)
        null = h3 & M32 < self._null_thr
        nullv = (h3 >> 32) % 8
        if level == 0:
            family: str | None = FAMILY_NAMES[(h >> 8) % len(FAMILY_NAMES)]
            given: str | None = GIVEN_NAMES[(h >> 16) % len(GIVEN_NAMES)]
            if (h2 >> 41) & 1:
                family = self._text(family or "", h2, 0, False)
            else:
                given = self._text(given or "", h2, 0, False)
            if (h4 >> 32) < self._nul_thr:
                given = (given or "") + "\x00x"
            name: dict[str, Any] | None = {"family": family, "given": given}
            birth: str | None = f"{1920 + (h >> 30) % 105:04d}-{1 + (h >> 40) % 12:02d}-{1 + (h >> 44) % 28:02d}"
            if null:
                if nullv == 0:
                    name = None
                elif nullv == 1:
                    name = {"family": None, "given": given}
                elif nullv == 2:
                    name = {"family": family, "given": None}
                elif nullv == 3:
                    name = {"given": given}
                elif nullv == 4:
                    name = {"family": family}
                elif nullv == 5:
                    name = {}
                else:
                    birth = None
            return {
                "id": rid,
                "mrn": f"{(idx * 7919 + 104729) % 10**10:010d}",
                "name": name,
                "gender": GENDERS[(h >> 50) % len(GENDERS)],
                "birth_date": birth,
                "updated_at": ts,
                "deleted": False,
            }
        if level == 1:
            pat = self._orig_parent(1, idx)
            performed = created - (h >> 8) % (14 * 86400) * US_PER_S - (h >> 30) % US_PER_S
            desc: str | None = self._text(STUDY_DESCRIPTIONS[(h >> 50) % len(STUDY_DESCRIPTIONS)], h2, h4, True)
            rec = {
                "id": rid,
                "patient_id": make_id(0, pat),
                "study_uid": make_uid(1, idx),
                "accession_no": f"A{(idx * 31337 + 7) % 10**9:09d}",
                "performed_at": timefmt.render(performed, h >> 20),
                "description": desc,
                "status": STATUSES[(h >> 56) % len(STATUSES)],
                "updated_at": ts,
                "deleted": False,
            }
            if null:
                rec[("accession_no", "performed_at", "description", "accession_no")[nullv % 4]] = None
            return rec
        stu = self._orig_parent(2, idx)
        rec = {
            "id": rid,
            "study_id": make_id(1, stu),
            "series_uid": make_uid(2, idx),
            "number": number,
            "modality": MODALITIES[(h >> 8) % len(MODALITIES)],
            "body_part": BODY_PARTS[(h >> 16) % len(BODY_PARTS)],
            "description": self._text(SERIES_DESCRIPTIONS[(h >> 50) % len(SERIES_DESCRIPTIONS)], h2, h4, True),
            "updated_at": ts,
            "deleted": False,
        }
        if null:
            rec[("number", "description", "body_part", "description")[nullv % 4]] = None
        return rec

    def _defect_for(self, level: int, idx: int, rid: str) -> str | None:
        """Defect injected into base/new record idx by the config (None for most)."""
        if self._explicit:
            kind = self._explicit.get(rid)
            if kind is not None:
                return kind
        if not (self._inv_thr or self._unk_thr):
            return None
        h = mix(self._levels[level].salt ^ 0xDEFEC7 ^ (idx << 16))
        if h & M32 < self._inv_thr and self._kinds[level]:
            kinds = self._kinds[level]
            return kinds[(h >> 40) % len(kinds)]
        if (h >> 32) < self._unk_thr and UNKNOWN_ENUM_KINDS[RESOURCES[level]]:
            kinds = UNKNOWN_ENUM_KINDS[RESOURCES[level]]
            return kinds[(h >> 20) % len(kinds)]
        return None

    # ------------------------------------------------------------------ lookups

    def _entry_or_base(self, level: int, rid: str) -> tuple[int, int, dict[str, Any], _Entry | None] | None:
        """(idx, t, served record (not a copy), entry) of the current version, or None."""
        e = self._ov[level].get(rid)
        if e is not None:
            return e.idx, e.t, e.rec, e
        parsed = parse_id(rid)
        if parsed is None or parsed[0] != level or parsed[1] >= self._n[level]:
            return None
        idx = parsed[1]
        lv = self._levels[level]
        t = self._base_t(level, idx)
        return idx, t, self._gen(level, idx, t, self._t(lv, idx)), None

    def get(self, resource: str, rid: str) -> dict[str, Any] | None:
        """Current version of a record as the API serves it (a tombstone if deleted), or None."""
        level = level_of(resource)
        with self._lock:
            found = self._entry_or_base(level, rid)
            return None if found is None else _copy(found[2])

    def counts(self) -> dict[str, Any]:
        """Live records per resource and ``as_of`` (RFC 3339 UTC), like ``GET /counts``."""
        with self._lock:
            out: dict[str, Any] = dict(zip(RESOURCES, self._live, strict=True))
            out["as_of"] = timefmt.render_utc(self.now_us())
            return out

    # ------------------------------------------------------------------ listing

    def _streams(self, level: int, after: Key, before: int | None, include_deleted: bool) -> Iterator[tuple]:
        """(t, id, source, idx) of records with (t, id) > after and t < before, in order."""
        lv = self._levels[level]
        end = before if before is not None else 1 << 62
        ov = self._ov[level]
        streams: list[Iterator[tuple]] = [self._base_stream(level, lv, after, end, ov)]
        if lv.period:
            streams.append(self._orphan_stream(level, lv, after, end, ov))
        if ov:
            streams.append(self._overlay_stream(level, after, end, include_deleted))
        if len(streams) == 1:
            return streams[0]
        # (t, id) is unique across streams (a record is in exactly one), so tuples compare cheaply.
        return heapq.merge(*streams)

    def _base_stream(self, level: int, lv: _Level, after: Key, end: int, ov: dict[str, _Entry]) -> Iterator[tuple]:
        t_after, id_after = after
        lo, hi = 0, lv.n
        while lo < hi:  # first i with (t(i), id(i)) > after
            mid = (lo + hi) // 2
            tm = self._t(lv, mid)
            if tm > t_after or (tm == t_after and make_id(level, mid) > id_after):
                hi = mid
            else:
                lo = mid + 1
        prefix = PREFIXES[level] + "_"
        period, residue = lv.period, lv.residue
        t_fn = self._t
        for i in range(lo, lv.n):
            t = t_fn(lv, i)
            if t >= end:
                return
            if period and i % period == residue:
                continue
            rid = f"{prefix}{i:012d}"
            if rid in ov:
                continue
            yield (t, rid, 0, i)

    def _orphan_stream(self, level: int, lv: _Level, after: Key, end: int, ov: dict[str, _Entry]) -> Iterator[tuple]:
        t_after, id_after = after
        count = (lv.n - lv.residue + lv.period - 1) // lv.period
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            i = mid * lv.period + lv.residue
            tm = self._orphan_t(lv, i)
            if tm > t_after or (tm == t_after and make_id(level, i) > id_after):
                hi = mid
            else:
                lo = mid + 1
        for j in range(lo, count):
            i = j * lv.period + lv.residue
            t = self._orphan_t(lv, i)
            if t >= end:
                return
            rid = make_id(level, i)
            if rid not in ov:
                yield (t, rid, 1, i)

    def _overlay_stream(self, level: int, after: Key, end: int, include_deleted: bool) -> Iterator[tuple]:
        keys = self._keys[level]
        ov = self._ov[level]
        for pos in range(bisect.bisect_right(keys, after), len(keys)):
            t, rid = keys[pos]
            if t >= end:
                return
            e = ov[rid]
            if include_deleted or not e.rec["deleted"]:
                yield (t, rid, 2, e.idx)

    def _materialise(self, level: int, item: tuple) -> dict[str, Any]:
        t, rid, src, idx = item
        if src == 2:
            return _copy(self._ov[level][rid].rec)
        if src == 1:
            return self._gen(level, idx, t, self._t(self._levels[level], idx))
        return self._gen(level, idx, t, t)

    def page(
        self,
        resource: str,
        *,
        since: int | None = None,
        before: int | None = None,
        include_deleted: bool = False,
        limit: int = 100,
        after: Key | None = None,
    ) -> tuple[list[dict[str, Any]], Key | None]:
        """Up to ``limit`` records with since <= t < before and (t, id) > after, in (t, id) order.

        Returns (records, key of the last record if more follow else None). Instants are
        microseconds; ``after`` is a (t_us, id) key from a previous page.
        """
        level = level_of(resource)
        if limit < 1:
            raise ValueError("limit must be >= 1")
        start: Key = (since, "") if since is not None else (-(1 << 62), "")
        if after is not None and after > start:
            start = after
        with self._lock:
            items = list(islice(self._streams(level, start, before, include_deleted), limit + 1))
            more = len(items) > limit
            items = items[:limit]
            records = [self._materialise(level, it) for it in items]
        last = (items[-1][0], items[-1][1]) if more else None
        return records, last

    def records(
        self,
        resource: str,
        *,
        since: int | None = None,
        before: int | None = None,
        include_deleted: bool = False,
        chunk: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Every record of a window in API order (the lock is held per chunk, not throughout)."""
        after: Key | None = None
        while True:
            recs, after = self.page(
                resource, since=since, before=before, include_deleted=include_deleted, limit=chunk, after=after
            )
            yield from recs
            if after is None:
                return

    def live_records(self, resource: str) -> Iterator[dict[str, Any]]:
        """Current live records of a resource, exactly as a full unbounded listing serves them."""
        return self.records(resource)

    def defects(self, resource: str) -> dict[str, str]:
        """id -> injected defect kind, for live records that carry one (config knobs, make_invalid).

        Scans the whole level: meant for test-sized data sets. Changes made by plain
        ``update`` calls are not tracked; ``repair`` clears a defect.
        """
        level = level_of(resource)
        out: dict[str, str] = {}
        after: Key = (-(1 << 62), "")
        while True:
            with self._lock:
                items = list(islice(self._streams(level, after, None, False), 5000))
                for _t, rid, src, idx in items:
                    if src == 2:
                        kind = self._ov[level][rid].defect
                    else:
                        kind = self._defect_for(level, idx, rid)
                    if kind is not None:
                        out[rid] = kind
            if len(items) < 5000:
                return out
            after = (items[-1][0], items[-1][1])

    # ------------------------------------------------------------------ files

    def file_bytes(self, image_id: str) -> bytes:
        """Deterministic content of an image's file (132..256 bytes: DICOM preamble, 'DICM', filler).

        Its length is the record's ``file_size`` (unless a defect or an update changed that
        field). KeyError if no such image was ever created; a deleted image's file still exists.
        """
        level = level_of("images")
        with self._lock:
            if self._entry_or_base(level, image_id) is None:
                raise KeyError(image_id)
        return self._file_bytes(image_id)

    def _file_bytes(self, image_id: str) -> bytes:
        idx = int(image_id[4:])
        size = _file_size(mix(self._levels[3].salt ^ idx))
        filler = hashlib.shake_128(f"{self.config.seed}:{image_id}".encode()).digest(size - 132)
        return b"\x00" * 128 + b"DICM" + filler

    def iter_files(self) -> Iterator[tuple[str, bytes]]:
        """(object key = file_path without its leading '/', bytes) per live image with a non-empty
        string file_path (a defective path without '/' is yielded as it is)."""
        for rec in self.live_records("images"):
            path = rec.get("file_path")
            if isinstance(path, str) and path:
                yield (path[1:] if path.startswith("/") else path), self._file_bytes(rec["id"])

    # ------------------------------------------------------------------ mutations

    def _put(
        self,
        level: int,
        idx: int,
        rid: str,
        fields: dict[str, Any],
        *,
        deleted: bool,
        prev: tuple[int, int, dict[str, Any], _Entry | None] | None,
        t: int,
        created: int,
        cause: str | None = None,
        defect: str | None = None,
    ) -> _Entry:
        """Store a new version (live content ``fields``, or a tombstone) at instant t."""
        ov, keys = self._ov[level], self._keys[level]
        entry = prev[3] if prev is not None else None
        if entry is not None:
            pos = bisect.bisect_left(keys, (entry.t, rid))
            del keys[pos]
            version = entry.version + 1
        else:
            version = 2 if prev is not None else 1
        live = _copy({k: v for k, v in fields.items() if k not in ("id", "updated_at", "deleted")})
        style = mix(self._levels[level].salt ^ idx ^ (version << 48)) >> 16
        ts = timefmt.render(t, style)
        if deleted:
            rec: dict[str, Any] = {"id": rid, "updated_at": ts, "deleted": True}
            if self.config.tombstone_style == "null":
                rec = {"id": rid, **dict.fromkeys(FIELDS[RESOURCES[level]]), "updated_at": ts, "deleted": True}
        else:
            rec = {"id": rid, **live, "updated_at": ts, "deleted": False}
        new = _Entry(idx, t, rec, live, created)
        new.version = version
        new.cause = cause
        new.defect = defect
        ov[rid] = new
        bisect.insort(keys, (t, rid))
        was_live = prev is not None and not prev[2]["deleted"]
        self._live[level] += int(not deleted) - int(was_live)
        return new

    def _require(self, level: int, rid: str) -> tuple[int, int, dict[str, Any], _Entry | None]:
        found = self._entry_or_base(level, rid)
        if found is None:
            raise KeyError(f"no {RESOURCES[level]} record {rid!r}")
        return found

    def _created(self, level: int, found: tuple[int, int, dict[str, Any], _Entry | None]) -> int:
        idx, _t, _rec, entry = found
        return entry.created if entry is not None else self._t(self._levels[level], idx)

    def _live_fields(self, found: tuple[int, int, dict[str, Any], _Entry | None]) -> dict[str, Any]:
        entry = found[3]
        src = entry.live if entry is not None else found[2]
        return {k: v for k, v in src.items() if k not in ("id", "updated_at", "deleted")}

    def _defect_of(self, level: int, found: tuple[int, int, dict[str, Any], _Entry | None]) -> str | None:
        idx, _t, rec, entry = found
        return entry.defect if entry is not None else self._defect_for(level, idx, rec["id"])

    def update(self, resource: str, rid: str, *, remove: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
        """New version of a live record with ``fields`` set and ``remove`` keys dropped, at now.

        Changing ``patient_id`` / ``study_id`` / ``series_uid`` to another simulator record
        re-parents it (cascades then follow the new parent). Raises KeyError for an unknown id,
        ValueError for a tombstone (use ``undelete``) or for id/updated_at/deleted.
        """
        level = level_of(resource)
        bad = {"id", "updated_at", "deleted"} & (set(fields) | set(remove))
        if bad:
            raise ValueError(f"cannot set {sorted(bad)}")
        with self._lock:
            found = self._require(level, rid)
            if found[2]["deleted"]:
                raise ValueError(f"{rid} is deleted; undelete it first")
            live = self._live_fields(found)
            live.update(fields)
            for k in remove:
                live.pop(k, None)
            link = LINK_FIELD[level]
            if link is not None and link in fields:
                self._reparent(level, found[0], fields[link])
            e = self._put(
                level, found[0], rid, live, deleted=False, prev=found, t=self._next_t(found),
                created=self._created(level, found), defect=self._defect_of(level, found),
            )  # fmt: skip
            return _copy(e.rec)

    def _reparent(self, level: int, idx: int, link_value: Any) -> None:
        parsed = parse_uid(link_value) if level == 3 and isinstance(link_value, str) else None
        if level != 3 and isinstance(link_value, str):
            parsed = parse_id(link_value)
        if parsed is None or parsed[0] != level - 1:
            return  # a dangling link: the record keeps its old parent for cascades
        new_parent = parsed[1]
        if new_parent == self._parent_of(level, idx):
            return
        self._parent_override[level][idx] = new_parent
        self._extra_children[level].setdefault(new_parent, []).append(idx)

    def _next_t(self, found: tuple[int, int, dict[str, Any], _Entry | None] | None) -> int:
        return self._not_before(found[1] + 1 if found is not None else 0)

    def _not_before(self, t: int) -> int:
        """max(now, t). A version must be later than the record's previous one even when the
        clock has not moved (manual clock); then the clock moves to it, so that no record is
        ever newer than now (``as_of``) and a window ending at now misses nothing."""
        now = self.now_us()
        if t <= now:
            return now
        if self.config.clock == "manual":
            self._manual_now = t
        else:
            self._last_now = t
        return t

    def _children(self, level: int, parent_idx: int) -> list[int]:
        """Indices at ``level`` whose current parent is ``parent_idx`` (level >= 1)."""
        per = self._per[level]
        out: list[int] = []
        if parent_idx < self._n[level - 1]:
            out.extend(range(parent_idx * per, parent_idx * per + per))
        out.extend(self._extra_children[level].get(parent_idx, ()))
        seen: set[int] = set()
        res = []
        for c in out:
            if c not in seen and self._parent_of(level, c) == parent_idx:
                seen.add(c)
                res.append(c)
        return res

    def _descendants(self, level: int, idx: int) -> Iterator[tuple[int, int]]:
        """(level, idx) of every descendant, parents before children."""
        frontier = [idx]
        for lv in range(level + 1, 4):
            nxt: list[int] = []
            for p in frontier:
                for c in self._children(lv, p):
                    nxt.append(c)
                    yield lv, c
            frontier = nxt

    def delete(self, resource: str, rid: str) -> list[str]:
        """Tombstone a live record and, at the same instant, each live descendant.

        Returns the ids tombstoned (the record first); [] if it was already deleted.
        """
        level = level_of(resource)
        with self._lock:
            found = self._require(level, rid)
            if found[2]["deleted"]:
                return []
            t = self._next_t(found)
            self._tombstone(level, found, t, rid)
            done = [rid]
            for lv, cidx in self._descendants(level, found[0]):
                cid = make_id(lv, cidx)
                cf = self._require(lv, cid)
                if not cf[2]["deleted"]:
                    self._tombstone(lv, cf, self._not_before(max(t, cf[1] + 1)), rid)
                    done.append(cid)
            return done

    def _tombstone(self, level: int, found: tuple, t: int, cause: str) -> None:
        self._put(
            level, found[0], found[2]["id"], self._live_fields(found), deleted=True, prev=found, t=t,
            created=self._created(level, found), cause=cause, defect=self._defect_of(level, found),
        )  # fmt: skip

    def undelete(self, resource: str, rid: str, cascade: bool = False) -> list[str]:
        """Bring a tombstoned record back (its last live content, updated_at now).

        With ``cascade``, also descendants whose tombstone came from this record's delete()
        (not ones deleted on their own or by another ancestor). Returns the ids restored;
        [] if the record was live.
        """
        level = level_of(resource)
        with self._lock:
            found = self._require(level, rid)
            if not found[2]["deleted"]:
                return []
            t = self._next_t(found)
            self._restore(level, found, t)
            done = [rid]
            if cascade:
                for lv, cidx in self._descendants(level, found[0]):
                    cf = self._require(lv, make_id(lv, cidx))
                    entry = cf[3]
                    if entry is not None and entry.deleted and entry.cause == rid:
                        self._restore(lv, cf, self._not_before(max(t, cf[1] + 1)))
                        done.append(cf[2]["id"])
            return done

    def _restore(self, level: int, found: tuple, t: int) -> None:
        entry: _Entry = found[3]
        self._put(
            level, found[0], found[2]["id"], dict(entry.live), deleted=False, prev=found, t=t,
            created=entry.created, defect=entry.defect,
        )  # fmt: skip

    def add(self, resource: str, parent_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Create a new record (generated content, ``fields`` override) under ``parent_id``, at now.

        ``parent_id`` is B's id of the parent (a series id for images) and is required except
        for patients. New ids continue the base numbering and are never reused.
        """
        level = level_of(resource)
        with self._lock:
            return _copy(self._add(level, parent_id, fields).rec)

    def _add(self, level: int, parent_id: str | None, fields: dict[str, Any]) -> _Entry:
        parent_idx = 0
        if level > 0:
            if parent_id is None:
                raise ValueError(f"{RESOURCES[level]} need a parent_id")
            parent_idx = self._require(level - 1, parent_id)[0]
        idx = self._next_idx[level]
        self._next_idx[level] += 1
        number = 1
        if level > 0:
            number = len(self._children(level, parent_idx)) + 1
            self._new_parent[level][idx] = parent_idx
            self._extra_children[level].setdefault(parent_idx, []).append(idx)
        t = self._next_t(None)
        rec = self._gen(level, idx, t, t, number=number)
        rec.update(fields)
        return self._put(
            level, idx, rec["id"], rec, deleted=False, prev=None, t=t, created=t,
            defect=self._defect_for(level, idx, rec["id"]),
        )  # fmt: skip

    def add_patient_tree(
        self, studies: int | None = None, series: int | None = None, images: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A new patient with ``studies`` x ``series`` x ``images`` new descendants (defaults: the
        config's shape), all at now. Returns {"patient": id, "studies": [...], "series": [...],
        "images": [...]}."""
        c = self.config
        n_stu = c.studies_per_patient if studies is None else studies
        n_ser = c.series_per_study if series is None else series
        n_img = c.images_per_series if images is None else images
        with self._lock:
            pat = self._add(0, None, fields).rec["id"]
            out: dict[str, Any] = {"patient": pat, "studies": [], "series": [], "images": []}
            for _ in range(n_stu):
                stu = self._add(1, pat, {}).rec["id"]
                out["studies"].append(stu)
                for _ in range(n_ser):
                    ser = self._add(2, stu, {}).rec["id"]
                    out["series"].append(ser)
                    out["images"].extend(self._add(3, ser, {}).rec["id"] for _ in range(n_img))
            return out

    def make_invalid(self, resource: str, rid: str, kind: str) -> dict[str, Any]:
        """New version of a live record carrying defect ``kind`` (DEFECT_KINDS / UNKNOWN_ENUM_KINDS)."""
        level = level_of(resource)
        if kind not in DEFECT_KINDS[resource] + UNKNOWN_ENUM_KINDS[resource]:
            raise ValueError(f"{kind!r} is not a defect kind of {resource}")
        with self._lock:
            found = self._require(level, rid)
            if found[2]["deleted"]:
                raise ValueError(f"{rid} is deleted")
            live = self._live_fields(found)
            apply_defect(level, live, kind, mix(found[0] ^ 0xBAD))
            e = self._put(
                level, found[0], rid, live, deleted=False, prev=found, t=self._next_t(found),
                created=self._created(level, found), defect=kind,
            )  # fmt: skip
            return _copy(e.rec)

    def repair(self, resource: str, rid: str) -> dict[str, Any]:
        """New version of a live record with its generated content free of defects (links kept)."""
        level = level_of(resource)
        with self._lock:
            found = self._require(level, rid)
            if found[2]["deleted"]:
                raise ValueError(f"{rid} is deleted")
            idx = found[0]
            clean = self._gen(level, idx, found[1], self._created(level, found), clean=True)
            link = LINK_FIELD[level]
            current = self._live_fields(found)
            if link is not None and link in current and self._parent_override[level].get(idx) is not None:
                clean[link] = current[link]
            if "number" in current and isinstance(current["number"], int):
                clean["number"] = current["number"]
            e = self._put(
                level, idx, rid, clean, deleted=False, prev=found, t=self._next_t(found),
                created=self._created(level, found), defect=None,
            )  # fmt: skip
            return _copy(e.rec)

    def mutate_fraction(self, fraction: float, seed: int = 0) -> dict[str, dict[str, int]]:
        """Change about ``fraction`` of each level's records at now: ~70% updates (10% of them
        same-content touches), ~15% deletes (cascading), ~10% new records (new children, or
        new patient trees), ~5% undeletes of deleted records. Deterministic for (state, seed).

        Returns {"updated"|"deleted"|"undeleted"|"added": {resource: count}}; cascaded
        tombstones/restores are counted at their own level.
        """
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be within [0, 1]")
        rng = random.Random(seed * 7919 + 17)
        out: dict[str, dict[str, int]] = {
            k: dict.fromkeys(RESOURCES, 0) for k in ("updated", "deleted", "undeleted", "added")
        }

        def bump(kind: str, ids: Iterable[str]) -> None:
            for i in ids:
                out[kind][RESOURCES[level_of_id(i)]] += 1

        with self._lock:
            for level in range(4):
                total = self._next_idx[level]
                k = min(total, round(fraction * total))
                if k == 0:
                    continue
                # Tombstones present before this level's round; a pick may already be live again.
                tombstones = sorted(rid2 for rid2, e in self._ov[level].items() if e.deleted)
                for idx in sorted(rng.sample(range(total), k)):
                    rid = make_id(level, idx)
                    found = self._entry_or_base(level, rid)
                    if found is None:
                        continue  # a new-record index that no level owns
                    r = rng.random()
                    if found[2]["deleted"]:
                        if r < 0.5:
                            bump("undeleted", self.undelete(RESOURCES[level], rid, cascade=True))
                        continue
                    if r < 0.70:
                        self._random_update(level, found, rng)
                        out["updated"][RESOURCES[level]] += 1
                    elif r < 0.85:
                        bump("deleted", self.delete(RESOURCES[level], rid))
                    elif r < 0.95:
                        if level == 0:
                            tree = self.add_patient_tree(images=max(1, self.config.images_per_series // 4))
                            bump("added", [tree["patient"], *tree["studies"], *tree["series"], *tree["images"]])
                        else:
                            parent = make_id(level - 1, self._parent_of(level, idx))
                            pf = self._entry_or_base(level - 1, parent)
                            if pf is not None and not pf[2]["deleted"]:
                                self._add(level, parent, {})
                                out["added"][RESOURCES[level]] += 1
                    else:
                        if tombstones:
                            pick = tombstones.pop(rng.randrange(len(tombstones)))
                            bump("undeleted", self.undelete(RESOURCES[level], pick, cascade=True))
            return out

    def _random_update(self, level: int, found: tuple, rng: random.Random) -> None:
        rid = found[2]["id"]
        resource = RESOURCES[level]
        if rng.random() < 0.1:
            self.update(resource, rid)  # same content, newer version
            return
        choice: dict[str, Any]
        if level == 0:
            choice = rng.choice(
                [
                    {"gender": rng.choice(GENDERS)},
                    {"name": {"family": rng.choice(FAMILY_NAMES), "given": rng.choice(GIVEN_NAMES)}},
                    {"birth_date": f"{rng.randint(1920, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"},
                ]
            )
        elif level == 1:
            choice = rng.choice(
                [{"status": rng.choice(STATUSES)}, {"description": rng.choice(STUDY_DESCRIPTIONS) + " (amended)"}]
            )
        elif level == 2:
            choice = rng.choice(
                [
                    {"body_part": rng.choice(BODY_PARTS)},
                    {"modality": rng.choice(MODALITIES)},
                    {"description": rng.choice(SERIES_DESCRIPTIONS) + " v2"},
                ]
            )
        else:
            choice = {"number": rng.randint(1, 10_000)}
        self.update(resource, rid, **choice)


def level_of_id(rid: str) -> int:
    """Level of an id made by this simulator (ValueError otherwise)."""
    parsed = parse_id(rid)
    if parsed is None:
        raise ValueError(f"not a simulator id: {rid!r}")
    return parsed[0]


def _copy(rec: dict[str, Any]) -> dict[str, Any]:
    """A copy callers may change freely (the patient name is the only nested value)."""
    out = dict(rec)
    name = out.get("name")
    if isinstance(name, dict):
        out["name"] = dict(name)
    return out


def _file_size(h: int) -> int:
    return 132 + (h >> 12) % 125


_BAD_DATES = ("1985-02-30", "30/01/1985", "unknown", "1985-13-01", "19850130")
_BAD_TIMES = ("2026-02-30T10:00:00Z", "yesterday", "31/12/2025 10:00", "2026-01-01T25:61:00+09:00")


def apply_defect(level: int, rec: dict[str, Any], kind: str, h: int) -> None:
    """Make ``rec`` (a live record's fields) carry defect ``kind``; ``h`` picks the variant."""
    v = (h >> 3) % 3
    missing_field = {
        "missing_mrn": "mrn",
        "missing_study_uid": "study_uid",
        "missing_status": "status",
        "missing_patient_id": "patient_id",
        "missing_series_uid": "series_uid",
        "missing_modality": "modality",
        "missing_study_id": "study_id",
        "missing_sop_uid": "sop_uid",
        "missing_file_path": "file_path",
    }.get(kind)
    if missing_field is not None:
        if v == 0:
            rec.pop(missing_field, None)
        else:
            rec[missing_field] = None if v == 1 else ""
        return
    if kind.startswith("unknown_"):
        field = kind.removeprefix("unknown_")
        values = UNKNOWN_VALUES[field]
        rec[field] = values[(h >> 5) % len(values)]
        return
    path = rec.get("file_path") or f"/2026/01/01/{rec.get('id', 'img')}.dcm"
    if kind == "empty_mrn":
        rec["mrn"] = ""
    elif kind == "bad_birth_date":
        rec["birth_date"] = _BAD_DATES[(h >> 5) % len(_BAD_DATES)]
    elif kind == "bad_performed_at":
        rec["performed_at"] = _BAD_TIMES[(h >> 5) % len(_BAD_TIMES)]
    elif kind == "relative_file_path":
        rec["file_path"] = path.lstrip("/")
    elif kind == "double_slash_file_path":
        # "/2026//01/..." or "//2026/01/...": an empty segment either inside or at the start
        rec["file_path"] = path[:5] + "/" + path[5:] if v else "/" + path
    elif kind == "dotdot_file_path":
        rec["file_path"] = path[:8] + "/.." + path[8:]  # "/2026/01/../01/..."
    elif kind == "dot_file_path":
        rec["file_path"] = path[:5] + "/." + path[5:]  # "/2026/./01/..."
    elif kind == "wrong_type":
        _wrong_type(level, rec, v)
    else:
        raise ValueError(f"unknown defect kind {kind!r}")


def _wrong_type(level: int, rec: dict[str, Any], v: int) -> None:
    if level == 0:
        if v == 0:
            rec["mrn"] = 12345678
        elif v == 1:
            rec["name"] = "Smith^John"
        else:
            rec["birth_date"] = 19850130
    elif level == 1:
        if v == 0:
            rec["performed_at"] = 1767225600
        elif v == 1:
            rec["accession_no"] = 12345
        else:
            rec["study_uid"] = 1.2
    elif level == 2:
        if v == 2:
            rec["series_uid"] = 123
        else:
            rec["number"] = "abc"
    elif v == 0:
        rec["number"] = "abc"
    elif v == 1:
        rec["file_size"] = "abc"
    else:
        rec["sop_uid"] = 42


__all__ = ["FIELDS", "UID_ROOT", "Catalogue", "apply_defect", "level_of"]
