"""C's catalogue: lazily computed base records, a version history of changes, and snapshots.

Base record ``i`` of a level is a pure function of (config, level, i); its ``modified`` is
monotone in ``i``, so a window maps to an index range by binary search and nothing is
materialised up front. Every change (update, delete, restore, move, new record) appends a
*version* to the record's history, numbered by a global sequence ``seq`` and visible from
``committed`` (= its instant + ``commit_delay_seconds``) on.

A *view* is (seq, instant): each record shows the newest of its versions with ``seq`` and
``committed`` inside it (or its base content if none is). A snapshot pins a view, so every page
of it is computed from the same data however the catalogue changed since, without copying
anything: memory grows with the number of changes, not with the catalogue.

All public methods take one lock; the HTTP server calls them from many threads.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import heapq
import hmac
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from simulator_c.config import DEFECT_KINDS, SimConfig, kinds_of
from simulator_c.vocab import (
    ANATOMIES,
    AWKWARD_TEXT,
    BUCKETS,
    COHORTS,
    FAMILY_NAMES,
    GIVEN_NAMES,
    LABELS,
    LINK_FIELD,
    M32,
    MODALITIES,
    NAME_FORMS,
    NOT_ALLOWED_BUCKETS,
    NOTES,
    OFFSETS,
    RESOURCES,
    SEXES,
    SIDES,
    STATES,
    UNKNOWN_CODES,
    UuidCodec,
    make_uid,
    mix,
    threshold,
)

MANUAL_DEFAULT_BASE = "2026-11-03T00:00:00Z"
NEG_INF = -(1 << 62)
POS_INF = 1 << 62

View = tuple[int, int]  # (seq, instant ms)
Key = tuple[Any, ...]  # (t, uuid) for records, (t, resource, uuid) for deletions


def level_of(resource: str) -> int:
    """0..3 for participants, visits, acquisitions, files; ValueError otherwise."""
    try:
        return RESOURCES.index(resource)
    except ValueError:
        raise ValueError(f"unknown resource {resource!r}; one of {RESOURCES}") from None


def to_ms(value: Any) -> int:
    """Epoch ms of a datetime, an RFC 3339 string or epoch seconds (int/float)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a time zone")
        return round(value.timestamp() * 1000)
    if isinstance(value, int | float):
        return round(value * 1000)
    if isinstance(value, str):
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        if dt.tzinfo is None:
            raise ValueError(f"{value!r} has no UTC offset")
        return round(dt.timestamp() * 1000)
    raise TypeError(f"cannot read an instant from {type(value).__name__}")


def rfc3339_ms(ms: int) -> str:
    """``2026-11-03T00:42:17.381Z`` (UTC, milliseconds), as ``/stats`` ``as_of``."""
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


class _Version:
    """One version of a changed record; ``rec`` is exactly what the API serves (None: a deletion)."""

    __slots__ = ("committed", "defect", "idx", "level", "next", "prev", "rec", "seq", "t", "uuid")

    def __init__(self, level: int, idx: int, uuid: str, seq: int, t: int, committed: int) -> None:
        self.level = level
        self.idx = idx
        self.uuid = uuid
        self.seq = seq
        self.t = t
        self.committed = committed
        self.rec: dict[str, Any] | None = None
        self.defect: str | None = None
        self.prev: _Version | None = None
        self.next: _Version | None = None


def _visible(v: _Version, view: View) -> bool:
    return v.seq <= view[0] and v.committed <= view[1]


def _shown(v: _Version, view: View) -> bool:
    """The version is the one its record shows in ``view``."""
    return _visible(v, view) and (v.next is None or not _visible(v.next, view))


@dataclass
class _Level:
    n: int
    per: int
    start: int
    span: int
    shared_thr: int
    salt: int


@dataclass
class Snapshot:
    """A pinned view of one window of one list (``resource`` may be ``"deletions"``)."""

    id: str
    resource: str
    modified_from: int | None
    modified_to: int | None
    view: View
    created_ms: int
    total: int
    number: int = 0  # 1-based count of snapshots issued (0: not issued, a one-page answer)
    pages_served: int = 0
    expire_after_pages: int | None = None  # forced expiry (FaultConfig.expire_every)
    ends: OrderedDict[int, Key] = field(default_factory=OrderedDict)  # offset -> key of the item before it


class Catalogue:
    """C's data: base records computed on demand plus a version history of later changes.

    Resources are ``"participants" | "visits" | "acquisitions" | "files"``; records are JSON-able
    dicts shaped as C's API serves them (every dict handed out is a fresh copy). Instants are
    epoch milliseconds (ints).
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        c = config
        self._n = c.sizes
        self._per = (1, c.visits_per_participant, c.acquisitions_per_visit, c.files_per_acquisition)
        if c.base_time is not None:
            self.base_ms = to_ms(c.base_time)
        elif c.clock == "manual":
            self.base_ms = to_ms(MANUAL_DEFAULT_BASE)
        else:
            self.base_ms = time.time_ns() // 1_000_000_000 * 1000
        self.uuids = UuidCodec(c.seed)
        self._seed_salt = mix(c.seed * 0x1000193 + 0xC5EED)
        self._awk_thr = threshold(c.awkward_fraction)
        self._null_thr = threshold(c.null_fraction)
        self._nul_thr = threshold(c.nul_fraction)
        self._bucket2_thr = threshold(c.second_bucket_fraction)
        self._inv_thr = threshold(c.invalid_fraction)
        chosen = c.invalid_kinds
        self._kinds = tuple(
            tuple(k for k in kinds_of(r) if (k in chosen if chosen is not None else k in DEFECT_KINDS[r]))
            for r in RESOURCES
        )
        self._explicit: list[dict[int, str]] = [{} for _ in RESOURCES]
        for ref, kind in c.defects.items():
            resource, _, idx = ref.partition(":")
            self._explicit[level_of(resource)][int(idx)] = kind
        self._delay_ms = round(c.commit_delay_seconds * 1000)
        self._levels = self._layout()
        self._file_cache: tuple[int, int, str, str, str] = (-1, -1, "", "", "")
        self._snap_key = hashlib.sha256(f"c-sim-snapshot-{c.seed}".encode()).digest()
        self._reset_state()

    # ------------------------------------------------------------------ layout and time

    def _layout(self) -> list[_Level]:
        """Place each level's base instants so that a child is never earlier than its parent
        (children lag their parents by one parent step plus one shared block of their own)."""
        c = self.config
        g = c.shared_group_size
        hist = max(1, round(c.history_seconds * 1000))
        n = self._n
        slack = min(2000, hist // 20)
        a = sum(1 / n[lv - 1] + g / n[lv] for lv in (1, 2, 3))
        span = max(1, int((hist - 4 * slack) / (1 + a)))
        lags = [0]
        for _ in range(100):
            steps = [-(-span // n[lv]) for lv in range(4)]
            lags = [0]
            for lv in (1, 2, 3):
                lags.append(lags[-1] + steps[lv - 1] + g * steps[lv] + slack)
            if lags[3] + span < hist or span == 1:
                break
            span = max(1, int(span * 0.97))
        t0 = self.base_ms - max(hist, lags[3] + span + 1)
        out = []
        for lv in range(4):
            salt = mix(self._seed_salt ^ (lv + 1) * 0x9E3779B9)
            shared = threshold(c.shared_modified_fraction) if g > 1 else 0
            out.append(_Level(n[lv], self._per[lv], t0 + lags[lv], span, shared, salt))
        return out

    def _t(self, level: int, i: int) -> int:
        """Base ``modified`` of record i (monotone non-decreasing in i)."""
        lv = self._levels[level]
        k = i
        if lv.shared_thr:
            g = self.config.shared_group_size
            b = i // g
            if mix(lv.salt ^ 0x51A7ED ^ (b << 20)) & M32 < lv.shared_thr:
                k = b * g
        return lv.start + k * lv.span // lv.n

    def _lower(self, level: int, t: int) -> int:
        """First base index whose instant is >= t."""
        lo, hi = 0, self._n[level]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._t(level, mid) >= t:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._seq = 0
        self._cur: list[dict[str, _Version]] = [{} for _ in RESOURCES]  # newest version (maybe uncommitted)
        self._first: list[dict[str, _Version]] = [{} for _ in RESOURCES]  # first version of a base record
        self._base_over: list[list[tuple[int, str]]] = [[] for _ in RESOURCES]  # (base t, uuid), sorted
        self._vkeys: list[list[tuple[int, str]]] = [[] for _ in RESOURCES]  # every live version, sorted
        self._vmap: list[dict[tuple[int, str], _Version]] = [{} for _ in RESOURCES]
        self._dels: list[tuple[int, str, str, int, int]] = []  # (deleted, resource, uuid, seq, committed)
        self._pending: list[_Version] = []  # versions not yet committed (commit delay)
        self._next_idx = list(self._n)
        self._parent: list[dict[int, int]] = [{} for _ in RESOURCES]  # moved or new: idx -> parent idx
        self._extra_children: list[dict[int, list[int]]] = [{} for _ in RESOURCES]
        self._first_parent: list[dict[int, int]] = [{} for _ in RESOURCES]  # new records' first parent
        self._local_no: list[dict[int, int]] = [{} for _ in RESOURCES]  # new records' number in parent
        self._next_local: list[dict[int, int]] = [{} for _ in RESOURCES]
        self._created: list[dict[int, int]] = [{} for _ in RESOURCES]  # new records' creation instant
        self._old_objects: dict[str, list[dict[str, str]]] = {}  # file uuid -> objects it left
        self._live = list(self._n)
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._snap_n = 0
        self._pin_n = 0
        self._generation = getattr(self, "_generation", 0) + 1  # old snapshot ids never match after reset
        self._clock_offset = 0
        self._manual_now = self.base_ms
        self._last_now = 0
        self._apply_history()

    def _apply_history(self) -> None:
        """Late parents and deletions during the history (config), as changes before base_time.

        Every ``period``-th record of a level is picked, so only the picked ones are visited.
        """
        c = self.config
        cap = self.base_ms - 1
        plans = (
            ("late", c.late_parent_fraction, (0, 1, 2)),
            ("delete", c.deleted_fraction, (0, 1, 2, 3)),
        )
        for kind, fraction, levels in plans:
            if fraction <= 0:
                continue
            period = max(1, round(1 / fraction))
            for level in levels:
                salt = self._levels[level].salt
                for idx in range((salt >> (7 if kind == "late" else 11)) % period, self._n[level], period):
                    uuid = self.uuids.encode(level, idx)
                    found = self._require(level, uuid)
                    if found[2] is None or found[1] >= cap:
                        continue
                    if kind == "late":
                        t = min(found[1] + round(c.late_parent_delay_seconds * 1000), cap)
                        rec: dict[str, Any] | None = found[2]
                    else:
                        t = found[1] + 1 + mix(salt ^ idx ^ 0xDE1) % max(1, cap - found[1])
                        rec = None
                    self._put(level, idx, uuid, rec, found, min(t, cap), self._defect_of(level, found))

    def reset(self) -> None:
        """Forget every change and snapshot, rewind the clock: the catalogue is as constructed."""
        with self._lock:
            self._reset_state()

    # ------------------------------------------------------------------ clock

    def now_ms(self) -> int:
        """The simulator's now (epoch ms). Never goes backwards in real mode unless set_now says so."""
        with self._lock:
            if self.config.clock == "manual":
                return self._manual_now
            now = time.time_ns() // 1_000_000 + self._clock_offset
            self._last_now = max(self._last_now, now)
            return self._last_now

    def advance(self, seconds: float) -> int:
        """Move the clock forward (manual: exactly; real: adds an offset to wall time)."""
        if seconds < 0:
            raise ValueError("advance() takes seconds >= 0; use set_now to go back")
        with self._lock:
            if self.config.clock == "manual":
                self._manual_now += round(seconds * 1000)
            else:
                self._clock_offset += round(seconds * 1000)
            return self.now_ms()

    def set_now(self, value: Any) -> int:
        """Set now (datetime, RFC 3339, or epoch seconds). A record's next version is still later
        than its previous one."""
        t = to_ms(value)
        with self._lock:
            if self.config.clock == "manual":
                self._manual_now = t
            else:
                self._clock_offset = t - time.time_ns() // 1_000_000
                self._last_now = 0
            return self.now_ms()

    def _not_before(self, t: int) -> int:
        """max(now, t); when t is later, the clock moves to it (no version is newer than now)."""
        now = self.now_ms()
        if t <= now:
            return now
        if self.config.clock == "manual":
            self._manual_now = t
        else:
            self._last_now = t
        return t

    def live_view(self) -> View:
        """The view the API serves now: every committed change."""
        with self._lock:
            return (self._seq, self.now_ms())

    # ------------------------------------------------------------------ ids and links

    def uuid(self, resource: str, index: int) -> str:
        """uuid of record ``index`` of a resource (base records are 0..n-1, new ones follow)."""
        return self.uuids.encode(level_of(resource), index)

    def _decode(self, level: int, uuid: Any) -> int | None:
        parsed = self.uuids.decode(uuid)
        if parsed is None or parsed[0] != level or parsed[1] >= self._next_idx[level]:
            return None
        if parsed[1] >= self._n[level] and uuid not in self._cur[level]:
            return None  # an index reserved by a new record that is not yet stored
        return parsed[1]

    def _parent_of(self, level: int, idx: int) -> int:
        p = self._parent[level].get(idx)
        return idx // self._per[level] if p is None else p

    def _orig_parent(self, level: int, idx: int) -> int:
        if idx < self._n[level]:
            return idx // self._per[level]
        return self._first_parent[level][idx]

    def _local(self, level: int, idx: int) -> int:
        if idx < self._n[level]:
            return idx % self._per[level] + 1
        return self._local_no[level][idx]

    def _children(self, level: int, parent_idx: int) -> list[int]:
        """Indices at ``level`` whose current parent is ``parent_idx`` (level >= 1)."""
        per = self._per[level]
        cand: list[int] = []
        if parent_idx < self._n[level - 1]:
            cand.extend(range(parent_idx * per, parent_idx * per + per))
        cand.extend(self._extra_children[level].get(parent_idx, ()))
        seen: set[int] = set()
        out = []
        for c in cand:
            if c not in seen and self._parent_of(level, c) == parent_idx:
                seen.add(c)
                out.append(c)
        return out

    # ------------------------------------------------------------------ generation

    def _created_of(self, level: int, idx: int) -> int:
        if idx < self._n[level]:
            return self._t(level, idx)
        return self._created[level][idx]

    def _text(self, base: str, h: int) -> str:
        s = base
        if h & M32 < self._awk_thr:
            s = AWKWARD_TEXT[(h >> 32) % len(AWKWARD_TEXT)] + (" " + s if (h >> 40) & 1 else "")
        if (h >> 44) & 0xFFFFF < self._nul_thr >> 12:
            mid = len(s) // 2
            s = s[:mid] + "\x00" + s[mid:]
        return s

    def _gen(self, level: int, idx: int, t: int, *, clean: bool = False, uuid: str | None = None) -> dict[str, Any]:
        """Record ``idx`` of ``level`` with ``modified`` t (links to its original parent).
        ``uuid``: the record's uuid when the caller has it already (saves recomputing it)."""
        h = mix(self._levels[level].salt ^ idx)
        h2 = mix(h ^ 0xA11)
        h3 = mix(h ^ 0xB22)
        null = h3 & M32 < self._null_thr
        nullv = (h3 >> 32) % 7
        enc = self.uuids.encode
        if level == 3:
            rec = self._gen_file(idx, t, h, h2, null, nullv, uuid or enc(3, idx))
        elif level == 0:
            family = FAMILY_NAMES[(h >> 8) % len(FAMILY_NAMES)]
            given = GIVEN_NAMES[(h >> 16) % len(GIVEN_NAMES)]
            form = NAME_FORMS[(h2 >> 32) % len(NAME_FORMS)] if h2 & M32 < self._awk_thr else "{f}, {g}"
            name: str | None = form.replace("{f}", family).replace("{g}", given)
            if (h2 >> 44) & 0xFFFFF < self._nul_thr >> 12 and name:
                name = name[:2] + "\x00" + name[2:]
            other = [{"system": COHORTS[(h >> 24) % len(COHORTS)], "value": f"C-{idx:06d}"}]
            if (h >> 28) & 3 == 0:
                other.append({"system": "site:mrn-legacy", "value": f"L{(idx * 31337) % 10**8:08d}"})
            rec = {
                "uuid": enc(0, idx),
                "modified": t,
                "identifiers": {"mrn": f"MRN-{(idx * 7919 + 104729) % 10**7:07d}", "other": other},
                "display_name": name,
                "sex": SEXES[(h >> 50) % len(SEXES)],
                "dob": f"{1930 + (h >> 30) % 80:04d}{1 + (h >> 40) % 12:02d}{1 + (h >> 44) % 28:02d}",
            }
            if null:
                if (h3 >> 36) % 4 == 0:
                    rec["display_name"] = None
                elif (h3 >> 36) % 4 == 1:
                    rec["sex"] = None
                elif (h3 >> 36) % 4 == 2:
                    rec["dob"] = None
                else:
                    rec["identifiers"]["other"] = []
        elif level == 1:
            created = self._created_of(1, idx)
            off_min, suffix = OFFSETS[(h >> 8) % len(OFFSETS)]
            start_s = created // 1000 - (h >> 12) % (14 * 86400)
            local = datetime.fromtimestamp(start_s, UTC) + timedelta(minutes=off_min)
            uid_idx = idx - 1 if idx > 0 and (h >> 56) < 4 else idx  # C can hold a study twice
            rec = {
                "uuid": enc(1, idx),
                "modified": t,
                "participant": enc(0, self._orig_parent(1, idx)),
                "study_instance_uid": make_uid(1, uid_idx),
                "accession": f"ACC-{local.year % 100:02d}-{idx % 10**6:06d}",
                "started": local.strftime("%Y-%m-%dT%H:%M:%S") + suffix,
                "label": self._text(LABELS[(h >> 20) % len(LABELS)], h2),
                "state": STATES[(h >> 40) % len(STATES)],
            }
            if null:
                rec[("accession", "started", "label", "accession", "started", "label", "label")[nullv]] = None
        else:
            local_no = self._local(2, idx)
            series_no: str | None = str(local_no)
            if h2 & M32 < self._awk_thr and (h2 >> 40) & 1:
                series_no = f"{local_no:03d}" if (h2 >> 41) & 1 else f"+{local_no}"
            rec = {
                "uuid": enc(2, idx),
                "modified": t,
                "visit": enc(1, self._orig_parent(2, idx)),
                "series_instance_uid": make_uid(2, idx),
                "series_no": series_no,
                "modality": MODALITIES[(h >> 8) % len(MODALITIES)],
                "anatomy": ANATOMIES[(h >> 16) % len(ANATOMIES)],
                "side": SIDES[(h >> 24) % len(SIDES)],
                "notes": self._text(NOTES[(h >> 32) % len(NOTES)], h2),
            }
            if null:
                rec[("series_no", "notes", "anatomy", "side", "notes", "series_no", "notes")[nullv]] = None
        if not clean:
            kind = self._defect_for(level, idx)
            if kind is not None:
                apply_defect(level, rec, kind, h)
        return rec

    def _gen_file(self, idx: int, t: int, h: int, h2: int, null: bool, nullv: int, uuid: str) -> dict[str, Any]:
        acq = self._orig_parent(3, idx)
        created = self._created_of(3, idx)
        day = created // 86_400_000
        cached = self._file_cache
        if cached[0] != acq or cached[1] != day:
            # Consecutive files mostly share acquisition and day: reuse the key prefix and UIDs.
            visit = self._orig_parent(2, acq)
            d = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y/%m/%d")
            prefix = f"v2/{d}/{self.uuids.encode(1, visit)}/{self._local(2, acq)}/"
            cached = self._file_cache = (acq, day, prefix, make_uid(2, acq), self.uuids.encode(2, acq))
        local_no = self._local(3, idx)
        content = self._content(idx)
        bucket = BUCKETS[int((h >> 20) & M32 < self._bucket2_thr)]
        rec: dict[str, Any] = {
            "uuid": uuid,
            "modified": t,
            "acquisition": cached[4],
            "sop_instance_uid": f"{cached[3]}.{local_no}",
            "index": local_no,
            "object": {"bucket": bucket, "key": f"{cached[2]}{local_no:04d}.dcm"},
            "bytes": len(content),
            "mime": "application/dicom",
            "sha256": hashlib.sha256(content).hexdigest(),
        }  # fmt: skip
        if null:
            rec[("index", "bytes", "mime", "sha256", "sha256", "index", "mime")[nullv]] = None
        return rec

    def _content(self, idx: int) -> bytes:
        size = 200 + mix(self._levels[3].salt ^ idx ^ 0xF11E) % 500
        filler = hashlib.shake_128(f"{self.config.seed}:{idx}".encode()).digest(size - 132)
        return b"\x00" * 128 + b"DICM" + filler

    def _defect_for(self, level: int, idx: int) -> str | None:
        """Defect injected into base/new record idx by the config (None for most)."""
        kind = self._explicit[level].get(idx)
        if kind is not None or not self._inv_thr:
            return kind
        h = mix(self._levels[level].salt ^ 0xDEFEC7 ^ (idx << 16))
        kinds = self._kinds[level]
        if h & M32 < self._inv_thr and kinds:
            return kinds[(h >> 40) % len(kinds)]
        return None

    # ------------------------------------------------------------------ lookups

    def _current(self, level: int, uuid: str) -> tuple[int, int, dict[str, Any] | None, _Version | None] | None:
        """(idx, t, record or None if deleted, version) of the newest version, or None if unknown."""
        v = self._cur[level].get(uuid)
        if v is not None:
            return v.idx, v.t, v.rec, v
        idx = self._decode(level, uuid)
        if idx is None or idx >= self._n[level]:
            return None
        t = self._t(level, idx)
        return idx, t, self._gen(level, idx, t), None

    def _require(self, level: int, uuid: str) -> tuple[int, int, dict[str, Any] | None, _Version | None]:
        found = self._current(level, uuid)
        if found is None:
            raise KeyError(f"no {RESOURCES[level]} record {uuid!r}")
        return found

    def _at(self, level: int, uuid: str, view: View) -> dict[str, Any] | None:
        """The record as ``view`` shows it (None: unknown, not yet visible or deleted)."""
        v = self._cur[level].get(uuid)
        while v is not None and not _visible(v, view):
            v = v.prev
        if v is not None:
            return None if v.rec is None else _copy(v.rec)
        idx = self._decode(level, uuid)
        if idx is None or idx >= self._n[level]:
            return None
        return self._gen(level, idx, self._t(level, idx))

    def get(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """The live record as ``GET /<resource>/{uuid}`` serves it now, or None (unknown or deleted)."""
        level = level_of(resource)
        with self._lock:
            return self._at(level, uuid, self.live_view())

    def is_deleted(self, resource: str, uuid: str) -> bool:
        """Whether the record's newest version is a deletion (KeyError if unknown)."""
        with self._lock:
            return self._require(level_of(resource), uuid)[2] is None

    def counts(self) -> dict[str, Any]:
        """Live records per resource and ``as_of``, like ``GET /stats``."""
        with self._lock:
            now = self.now_ms()
            out: dict[str, Any] = dict(zip(RESOURCES, self._live, strict=True))
            if self._pending:
                self._pending = [v for v in self._pending if v.committed > now]
                view = (self._seq, now)
                firsts: dict[tuple[int, str], _Version] = {}
                for v in self._pending:
                    firsts.setdefault((v.level, v.uuid), v)
                for level, uuid in firsts:
                    shown = self._at(level, uuid, view) is not None
                    newest = self._cur[level][uuid].rec is not None
                    out[RESOURCES[level]] += int(shown) - int(newest)
            out["as_of"] = rfc3339_ms(now)
            return out

    # ------------------------------------------------------------------ streams of a view

    def _stream(self, level: int, view: View, after: Key, end: int) -> Iterator[tuple]:
        """(t, uuid, source, idx-or-version) of records shown in ``view`` with (t, uuid) > after
        and t < end, in (t, uuid) order."""
        base = self._base_stream(level, view, after, end)
        if not self._vkeys[level]:
            return base
        return heapq.merge(base, self._overlay_stream(level, view, after, end), key=lambda it: (it[0], it[1]))

    def _base_stream(self, level: int, view: View, after: Key, end: int) -> Iterator[tuple]:
        t_after = after[0]
        n = self._n[level]
        first = self._first[level]
        enc = self.uuids.encode
        t_fn = self._t
        i = self._lower(level, t_after)
        while i < n:
            t = t_fn(level, i)
            if t >= end:
                return
            j = i + 1
            while j < n and t_fn(level, j) == t:
                j += 1
            run = sorted((enc(level, k), k) for k in range(i, j)) if j - i > 1 else [(enc(level, i), i)]
            for u, k in run:
                if (t, u) <= after:
                    continue
                f = first.get(u)
                if f is not None and _visible(f, view):
                    continue  # changed: served at the position of its version instead
                yield (t, u, 0, k)
            i = j

    def _overlay_stream(self, level: int, view: View, after: Key, end: int) -> Iterator[tuple]:
        keys = self._vkeys[level]
        vmap = self._vmap[level]
        for pos in range(bisect.bisect_right(keys, (after[0], after[1])), len(keys)):
            k = keys[pos]
            if k[0] >= end:
                return
            v = vmap[k]
            if _shown(v, view):
                yield (k[0], k[1], 2, v)

    def _materialise(self, level: int, item: tuple) -> dict[str, Any]:
        t, u, src, x = item
        if src == 2:
            return _copy(x.rec)
        return self._gen(level, x, t, uuid=u)

    def _count(self, level: int, view: View, lo_t: int, hi_t: int) -> int:
        """How many records ``view`` shows with lo_t <= modified < hi_t (matches ``_stream``)."""
        total = self._lower(level, hi_t) - self._lower(level, lo_t) if hi_t > lo_t else 0
        over = self._base_over[level]
        first = self._first[level]
        for pos in range(bisect.bisect_left(over, (lo_t, "")), len(over)):
            t, u = over[pos]
            if t >= hi_t:
                break
            if _visible(first[u], view):
                total -= 1
        keys = self._vkeys[level]
        vmap = self._vmap[level]
        for pos in range(bisect.bisect_left(keys, (lo_t, "")), len(keys)):
            k = keys[pos]
            if k[0] >= hi_t:
                break
            if _shown(vmap[k], view):
                total += 1
        return total

    def _del_stream(self, view: View, after: Key, end: int) -> Iterator[tuple]:
        dels = self._dels
        for pos in range(bisect.bisect_right(dels, (after[0], after[1], after[2], POS_INF)), len(dels)):
            d = dels[pos]
            if d[0] >= end:
                return
            if d[3] <= view[0] and d[4] <= view[1]:
                yield d

    # ------------------------------------------------------------------ listing

    def records(
        self,
        resource: str,
        *,
        modified_from: int | None = None,
        modified_to: int | None = None,
        view: View | None = None,
        chunk: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Records of a window in API order, as ``view`` (default: now) shows them."""
        if resource == "deletions":
            yield from self.deletions(modified_from=modified_from, modified_to=modified_to, view=view)
            return
        level = level_of(resource)
        end = POS_INF if modified_to is None else modified_to
        after: Key = (NEG_INF if modified_from is None else modified_from, "")
        while True:
            with self._lock:
                v = view or self.live_view()
                items = list(islice(self._stream(level, v, after, end), chunk))
                recs = [self._materialise(level, it) for it in items]
            yield from recs
            if len(items) < chunk:
                return
            after = (items[-1][0], items[-1][1])

    def live_records(self, resource: str) -> Iterator[dict[str, Any]]:
        """Every live record of a resource, exactly as a full unbounded listing serves it now."""
        return self.records(resource)

    def deletions(
        self, *, modified_from: int | None = None, modified_to: int | None = None, view: View | None = None
    ) -> list[dict[str, Any]]:
        """Deletion items of a window (on ``deleted``) in feed order, as ``view`` (default: now) shows them."""
        with self._lock:
            v = view or self.live_view()
            lo = NEG_INF if modified_from is None else modified_from
            end = POS_INF if modified_to is None else modified_to
            return [_del_item(d) for d in self._del_stream(v, (lo, "", ""), end)]

    def pin(self, resource: str, modified_from: int | None, modified_to: int | None) -> Snapshot:
        """A snapshot of a window as it stands now (not registered: see ``issue``)."""
        with self._lock:
            view = self.live_view()
            lo = NEG_INF if modified_from is None else modified_from
            hi = POS_INF if modified_to is None else modified_to
            if resource == "deletions":
                total = sum(1 for _ in self._del_stream(view, (lo, "", ""), hi))
            else:
                total = self._count(level_of(resource), view, lo, hi)
            self._pin_n += 1
            sid = hmac.digest(self._snap_key, f"{self._generation}:{self._pin_n}".encode(), "sha256")
            token = base64.urlsafe_b64encode(sid[:12]).decode().rstrip("=")
            return Snapshot(token, resource, modified_from, modified_to, view, view[1], total)

    def issue(self, snap: Snapshot) -> int:
        """Register a snapshot so that its id can be used (returns its 1-based number)."""
        with self._lock:
            self._snap_n += 1
            snap.number = self._snap_n
            self._snapshots[snap.id] = snap
            self._purge_snapshots()
            return snap.number

    def _purge_snapshots(self) -> None:
        ttl = round(self.config.snapshot_ttl_seconds * 1000)
        now = self.now_ms()
        snaps = self._snapshots
        while snaps:
            oldest = next(iter(snaps.values()))
            if len(snaps) > self.config.max_snapshots or now - oldest.created_ms >= ttl:
                snaps.popitem(last=False)
            else:
                break

    def snapshot(self, sid: str) -> Snapshot | None:
        """The issued, unexpired snapshot of that id, or None (expired, forgotten or never issued)."""
        with self._lock:
            snap = self._snapshots.get(sid)
            if snap is None:
                return None
            if self.now_ms() - snap.created_ms >= round(self.config.snapshot_ttl_seconds * 1000):
                del self._snapshots[sid]
                return None
            return snap

    def forget_snapshot(self, sid: str) -> None:
        """Forget one snapshot (its next use gets 410)."""
        with self._lock:
            self._snapshots.pop(sid, None)

    def expire_snapshots(self) -> int:
        """Forget every snapshot now (their next use gets 410); returns how many."""
        with self._lock:
            n = len(self._snapshots)
            self._snapshots.clear()
            return n

    @property
    def snapshots_held(self) -> int:
        """Snapshots issued and not yet forgotten (expired ones go at the next pin or use)."""
        return len(self._snapshots)

    def page(self, snap: Snapshot, page: int, page_size: int) -> list[dict[str, Any]]:
        """Page ``page`` (1-based) of a snapshot: items [(page-1)*size, page*size) of its view.

        A client following the next link costs one page of work per page: the snapshot keeps
        the key where each page it served ended.
        """
        offset = (page - 1) * page_size
        if offset >= snap.total:
            return []
        lo = NEG_INF if snap.modified_from is None else snap.modified_from
        end = POS_INF if snap.modified_to is None else snap.modified_to
        deletions = snap.resource == "deletions"
        with self._lock:
            start_off, after = 0, ((lo, "", "") if deletions else (lo, ""))
            best = max((o for o in snap.ends if o <= offset), default=None)
            if best is not None:
                start_off, after = best, snap.ends[best]
            if deletions:
                it: Iterator[tuple] = self._del_stream(snap.view, after, end)
            else:
                level = level_of(snap.resource)
                if offset - start_off > 1000:  # far from any page end known: seek by counting
                    start_off, after = self._seek(level, snap.view, lo, end, offset)
                it = self._stream(level, snap.view, after, end)
            items = list(islice(it, offset - start_off, offset - start_off + page_size))
            if items:
                last = items[-1]
                snap.ends[offset + len(items)] = last[:3] if deletions else (last[0], last[1])
                while len(snap.ends) > 64:
                    snap.ends.popitem(last=False)
            if deletions:
                return [_del_item(d) for d in items]
            return [self._materialise(level, x) for x in items]

    def _seek(self, level: int, view: View, lo: int, end: int, offset: int) -> tuple[int, Key]:
        """(o, key) such that the ``o`` records of the window before ``key`` are all before
        ``offset`` and the ones from ``key`` on start at most one run of equal ``modified``
        before it: binary search on the instant by counting, O(log) instead of a long skip."""
        keys = self._vkeys[level]
        candidates = [self._levels[level].start]
        if keys:
            candidates.append(keys[0][0])
        a = max(lo, min(candidates))
        top = self._t(level, self._n[level] - 1) + 1 if self._n[level] else a
        b = min(end, max(top, keys[-1][0] + 1 if keys else a))
        while a < b:  # largest x in [a, b] with count(lo, x) <= offset
            mid = (a + b + 1) // 2
            if self._count(level, view, lo, mid) <= offset:
                a = mid
            else:
                b = mid - 1
        return self._count(level, view, lo, a), (a, "")

    def defects(self, resource: str) -> dict[str, str]:
        """uuid -> defect kind, for live records that carry one (config, ``make_invalid``).

        Scans the whole resource: meant for test-sized data. Plain ``update`` calls are not
        tracked; ``repair`` clears a defect.
        """
        level = level_of(resource)
        out: dict[str, str] = {}
        after: Key = (NEG_INF, "")
        while True:
            with self._lock:
                items = list(islice(self._stream(level, self.live_view(), after, POS_INF), 5000))
                for _t, u, src, x in items:
                    kind = x.defect if src == 2 else self._defect_for(level, x)
                    if kind is not None:
                        out[u] = kind
            if len(items) < 5000:
                return out
            after = (items[-1][0], items[-1][1])

    # ------------------------------------------------------------------ files

    def file_bytes(self, uuid: str) -> bytes:
        """Content of a file's object(s) (200..699 bytes: DICOM preamble, 'DICM', filler); its
        length and SHA-256 are the record's ``bytes`` and ``sha256`` unless a change says otherwise.
        KeyError if no such file exists (a deleted file's objects still exist)."""
        with self._lock:
            found = self._require(3, uuid)
        return self._content(found[0])

    def iter_objects(self, *, include_moved: bool = True) -> Iterator[tuple[tuple[str, str], str]]:
        """((bucket, key), file uuid) of every object a live file names, in both buckets; with
        ``include_moved`` also the objects files were moved away from (C keeps them 7 days).
        Objects whose key is not a valid relative key or whose bucket is empty are left out
        (A never reads them)."""
        seen: set[tuple[str, str]] = set()
        for rec in self.live_records("files"):
            objs: list[Any] = [rec.get("object")]
            if include_moved:
                with self._lock:
                    objs.extend(self._old_objects.get(rec["uuid"], ()))
            for obj in objs:
                if not isinstance(obj, dict):
                    continue
                bucket, key = obj.get("bucket"), obj.get("key")
                if isinstance(bucket, str) and bucket and isinstance(key, str) and is_relative_key(key):
                    if (bucket, key) not in seen:
                        seen.add((bucket, key))
                        yield (bucket, key), rec["uuid"]

    def iter_files(self, *, include_moved: bool = True) -> Iterator[tuple[tuple[str, str], bytes]]:
        """((bucket, key), bytes) of every object of ``iter_objects``: what C's buckets hold."""
        for obj, uuid in self.iter_objects(include_moved=include_moved):
            idx = self.uuids.decode(uuid)
            assert idx is not None
            yield obj, self._content(idx[1])

    # ------------------------------------------------------------------ mutations

    def _put(
        self,
        level: int,
        idx: int,
        uuid: str,
        rec: dict[str, Any] | None,
        prev: tuple[int, int, dict[str, Any] | None, _Version | None] | None,
        t: int,
        defect: str | None,
    ) -> _Version:
        """Store a new version (``rec``, or a deletion when None) at instant t."""
        self._seq += 1
        v = _Version(level, idx, uuid, self._seq, t, t + self._delay_ms)
        v.defect = defect
        if rec is not None:
            rec = _copy(rec)
            rec["uuid"] = uuid
            rec["modified"] = t
            v.rec = rec
            key = (t, uuid)
            bisect.insort(self._vkeys[level], key)
            self._vmap[level][key] = v
        else:
            bisect.insort(self._dels, (t, RESOURCES[level], uuid, v.seq, v.committed))
        old = prev[3] if prev is not None else None
        if old is not None:
            old.next = v
            v.prev = old
        elif prev is not None:  # first change of a base record
            self._first[level][uuid] = v
            bisect.insort(self._base_over[level], (prev[1], uuid))
        self._cur[level][uuid] = v
        was_live = prev is not None and prev[2] is not None
        self._live[level] += int(rec is not None) - int(was_live)
        if self._delay_ms:
            self._pending.append(v)
        return v

    def _next_t(self, prev_t: int | None) -> int:
        return self._not_before(0 if prev_t is None else prev_t + 1)

    def _defect_of(self, level: int, found: tuple[int, int, dict[str, Any] | None, _Version | None]) -> str | None:
        v = found[3]
        return v.defect if v is not None else self._defect_for(level, found[0])

    def _live_rec(self, level: int, uuid: str) -> tuple[tuple[int, int, dict[str, Any] | None, _Version | None], dict]:
        found = self._require(level, uuid)
        if found[2] is None:
            raise ValueError(f"{RESOURCES[level]} {uuid} is deleted; restore it first")
        return found, _copy(found[2])

    def update(self, resource: str, uuid: str, *, remove: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
        """New version of a live record with ``fields`` set (nested values replaced whole) and
        ``remove`` keys dropped, at now. Setting the link field (participant/visit/acquisition) to
        another record's uuid moves it there. KeyError if unknown, ValueError if deleted."""
        level = level_of(resource)
        bad = {"uuid", "modified"} & (set(fields) | set(remove))
        if bad:
            raise ValueError(f"cannot set {sorted(bad)}")
        with self._lock:
            found, rec = self._live_rec(level, uuid)
            rec.update(fields)
            for k in remove:
                rec.pop(k, None)
            link = LINK_FIELD[level]
            if link is not None and link in fields:
                self._reparent(level, found[0], fields[link])
            v = self._put(level, found[0], uuid, rec, found, self._next_t(found[1]), self._defect_of(level, found))
            return _copy(v.rec)  # type: ignore[arg-type]

    def _reparent(self, level: int, idx: int, link_value: Any) -> None:
        new_parent = self._decode(level - 1, link_value)
        if new_parent is None or new_parent == self._parent_of(level, idx):
            return  # a dangling link keeps the old parent for merges
        self._parent[level][idx] = new_parent
        self._extra_children[level].setdefault(new_parent, []).append(idx)

    def move(self, resource: str, uuid: str, parent: str) -> dict[str, Any]:
        """Move a visit, acquisition or file to another parent (new ``modified``)."""
        level = level_of(resource)
        link = LINK_FIELD[level]
        if link is None:
            raise ValueError("participants have no parent; use merge_participants")
        with self._lock:
            self._require(level - 1, parent)
            return self.update(resource, uuid, **{link: parent})

    def delete(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """Delete a live record: publishes one deletion item (returned); children stay live in
        their lists, pointing at it. None if it was already deleted."""
        level = level_of(resource)
        with self._lock:
            found = self._require(level, uuid)
            if found[2] is None:
                return None
            v = self._put(level, found[0], uuid, None, found, self._next_t(found[1]), self._defect_of(level, found))
            return {"resource": resource, "uuid": uuid, "deleted": v.t}

    def restore(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """Bring a deleted record back with its last live content and a ``modified`` newer than
        its deletion (same uuid). None if it was live."""
        level = level_of(resource)
        with self._lock:
            found = self._require(level, uuid)
            if found[2] is not None:
                return None
            last = found[3]
            assert last is not None
            live = last.prev
            while live is not None and live.rec is None:
                live = live.prev
            if live is not None:
                rec = live.rec
            else:
                rec = self._gen(level, found[0], self._t(level, found[0]))
            v = self._put(level, found[0], uuid, rec, found, self._next_t(found[1]), last.defect)
            return _copy(v.rec)  # type: ignore[arg-type]

    undelete = restore

    def merge_participants(self, source: str, target: str) -> dict[str, Any]:
        """C's merge of participant P (``source``) into Q (``target``): every visit of P moves to
        Q (each gets a new ``modified``), then P is deleted. Returns {"moved": [...], "deleted": item}."""
        with self._lock:
            p = self._require(0, source)
            self._require(0, target)
            if source == target:
                raise ValueError("cannot merge a participant into itself")
            moved = []
            for vidx in self._children(1, p[0]):
                vu = self.uuids.encode(1, vidx)
                if self._require(1, vu)[2] is not None:
                    self.update("visits", vu, participant=target)
                    moved.append(vu)
            return {"moved": moved, "deleted": self.delete("participants", source)}

    def move_file(self, uuid: str, bucket: str | None = None) -> dict[str, Any]:
        """Move a file to another bucket (default: the other of ``c-archive-eu-1/2``): a new
        ``object`` (same key) and a new ``modified``; the old object stays in ``iter_files``."""
        with self._lock:
            _found, rec = self._live_rec(3, uuid)
            obj = rec.get("object")
            if not isinstance(obj, dict):
                raise ValueError("file has no object to move")
            if bucket is None:
                bucket = BUCKETS[1] if obj.get("bucket") == BUCKETS[0] else BUCKETS[0]
            if bucket == obj.get("bucket"):
                raise ValueError(f"file is already in {bucket}")
            self._old_objects.setdefault(uuid, []).append(dict(obj))
            return self.update("files", uuid, object={**obj, "bucket": bucket})

    def add(self, resource: str, parent: str | None = None, **fields: Any) -> dict[str, Any]:
        """Create a record (generated content, ``fields`` override) under ``parent`` (required
        except for participants), at now. New uuids are never reused."""
        level = level_of(resource)
        with self._lock:
            return _copy(self._add(level, parent, fields).rec)  # type: ignore[arg-type]

    def _add(self, level: int, parent: str | None, fields: dict[str, Any]) -> _Version:
        pidx = 0
        if level > 0:
            if parent is None:
                raise ValueError(f"{RESOURCES[level]} need a parent")
            pidx = self._require(level - 1, parent)[0]
        idx = self._next_idx[level]
        self._next_idx[level] += 1
        t = self._next_t(None)
        self._created[level][idx] = t
        if level > 0:
            start = self._per[level] + 1 if pidx < self._n[level - 1] else 1
            local_no = self._next_local[level].get(pidx, start)
            self._next_local[level][pidx] = local_no + 1
            self._local_no[level][idx] = local_no
            self._first_parent[level][idx] = pidx
            self._extra_children[level].setdefault(pidx, []).append(idx)
        uuid = self.uuids.encode(level, idx)
        rec = self._gen(level, idx, t)
        rec.update(fields)
        return self._put(level, idx, uuid, rec, None, t, self._defect_for(level, idx))

    def add_participant_tree(
        self, visits: int | None = None, acquisitions: int | None = None, files: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A new participant with ``visits`` x ``acquisitions`` x ``files`` new descendants
        (defaults: the config's shape), all at now. Returns the new uuids per resource."""
        c = self.config
        nv = c.visits_per_participant if visits is None else visits
        na = c.acquisitions_per_visit if acquisitions is None else acquisitions
        nf = c.files_per_acquisition if files is None else files
        with self._lock:
            p = self._add(0, None, fields).uuid
            out: dict[str, Any] = {"participant": p, "visits": [], "acquisitions": [], "files": []}
            for _ in range(nv):
                v = self._add(1, p, {}).uuid
                out["visits"].append(v)
                for _ in range(na):
                    a = self._add(2, v, {}).uuid
                    out["acquisitions"].append(a)
                    out["files"].extend(self._add(3, a, {}).uuid for _ in range(nf))
            return out

    def make_invalid(self, resource: str, uuid: str, kind: str) -> dict[str, Any]:
        """New version of a live record carrying defect ``kind`` (see ``config.kinds_of``)."""
        level = level_of(resource)
        if kind not in kinds_of(resource):
            raise ValueError(f"{kind!r} is not a defect kind of {resource}")
        with self._lock:
            found, rec = self._live_rec(level, uuid)
            apply_defect(level, rec, kind, mix(found[0] ^ 0xBAD))
            v = self._put(level, found[0], uuid, rec, found, self._next_t(found[1]), kind)
            return _copy(v.rec)  # type: ignore[arg-type]

    def repair(self, resource: str, uuid: str) -> dict[str, Any]:
        """New version of a live record with its generated content free of defects (its current
        link and object kept)."""
        level = level_of(resource)
        with self._lock:
            found, current = self._live_rec(level, uuid)
            clean = self._gen(level, found[0], found[1], clean=True)
            link = LINK_FIELD[level]
            if link is not None:
                clean[link] = self.uuids.encode(level - 1, self._parent_of(level, found[0]))
            obj = current.get("object")
            if (
                level == 3
                and isinstance(obj, dict)
                and obj.get("bucket") in BUCKETS
                and is_relative_key(obj.get("key"))
            ):
                clean["object"] = obj
            v = self._put(level, found[0], uuid, clean, found, self._next_t(found[1]), None)
            return _copy(v.rec)  # type: ignore[arg-type]

    def mutate_fraction(self, fraction: float, seed: int = 0) -> dict[str, dict[str, int]]:
        """Change about ``fraction`` of each resource's records at now: ~55% updates, ~15%
        deletes, ~10% moves to another parent (participants: merges), ~8% bucket moves (files;
        updates elsewhere), ~9% new records, ~3% restores; deleted picks are restored half the
        time. Deterministic for (state, seed). Returns counts per kind and resource."""
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be within [0, 1]")
        rng = random.Random(seed * 7919 + 17)
        kinds = ("updated", "deleted", "restored", "moved", "merged", "bucket_moved", "added")
        out: dict[str, dict[str, int]] = {k: dict.fromkeys(RESOURCES, 0) for k in kinds}
        with self._lock:
            for level in range(4):
                resource = RESOURCES[level]
                total = self._next_idx[level]
                k = min(total, round(fraction * total))
                deleted = sorted(u for u, v in self._cur[level].items() if v.rec is None)
                for idx in sorted(rng.sample(range(total), k)):
                    uuid = self.uuids.encode(level, idx)
                    found = self._current(level, uuid)
                    if found is None:
                        continue
                    r = rng.random()
                    if found[2] is None:
                        if r < 0.5:
                            self.restore(resource, uuid)
                            out["restored"][resource] += 1
                        continue
                    if r < 0.55:
                        self._random_update(level, uuid, rng)
                        out["updated"][resource] += 1
                    elif r < 0.70:
                        self.delete(resource, uuid)
                        out["deleted"][resource] += 1
                    elif r < 0.80:
                        target = self._random_live(level if level == 0 else level - 1, rng)
                        if level == 0:
                            if target is not None and target != uuid:
                                self.merge_participants(uuid, target)
                                out["merged"][resource] += 1
                        elif target is not None:
                            self.move(resource, uuid, target)
                            out["moved"][resource] += 1
                    elif r < 0.88:
                        if level == 3 and isinstance(found[2].get("object"), dict):
                            self.move_file(uuid)
                            out["bucket_moved"][resource] += 1
                        else:
                            self._random_update(level, uuid, rng)
                            out["updated"][resource] += 1
                    elif r < 0.97:
                        if level == 0:
                            tree = self.add_participant_tree(1, 1, 2)
                            for res in RESOURCES:
                                got = tree["participant" if res == "participants" else res]
                                out["added"][res] += 1 if isinstance(got, str) else len(got)
                        else:
                            parent = self.uuids.encode(level - 1, self._parent_of(level, idx))
                            pf = self._current(level - 1, parent)
                            if pf is not None and pf[2] is not None:
                                self._add(level, parent, {})
                                out["added"][resource] += 1
                    elif deleted:
                        if self.restore(resource, deleted.pop(rng.randrange(len(deleted)))) is not None:
                            out["restored"][resource] += 1
            return out

    def _random_live(self, level: int, rng: random.Random) -> str | None:
        for _ in range(20):
            uuid = self.uuids.encode(level, rng.randrange(self._next_idx[level]))
            found = self._current(level, uuid)
            if found is not None and found[2] is not None:
                return uuid
        return None

    def _random_update(self, level: int, uuid: str, rng: random.Random) -> None:
        resource = RESOURCES[level]
        if rng.random() < 0.1:
            self.update(resource, uuid)  # same content, newer modified
            return
        choice: dict[str, Any]
        if level == 0:
            choice = rng.choice(
                [
                    {"sex": rng.choice(SEXES)},
                    {"display_name": f"{rng.choice(FAMILY_NAMES)}, {rng.choice(GIVEN_NAMES)}"},
                    {"dob": f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"},
                ]
            )
        elif level == 1:
            choice = rng.choice([{"state": rng.choice(STATES)}, {"label": rng.choice(LABELS) + " (amended)"}])
        elif level == 2:
            choice = rng.choice(
                [{"anatomy": rng.choice(ANATOMIES)}, {"side": rng.choice(SIDES)}, {"notes": rng.choice(NOTES) + " v2"}]
            )
        else:
            choice = rng.choice([{"index": rng.randint(1, 10_000)}, {"mime": rng.choice(["application/dicom", None])}])
        self.update(resource, uuid, **choice)


def _del_item(d: tuple[int, str, str, int, int]) -> dict[str, Any]:
    return {"resource": d[1], "uuid": d[2], "deleted": d[0]}


def _copy(rec: dict[str, Any]) -> dict[str, Any]:
    """A copy callers may change freely (nested dicts and lists copied too)."""
    out = dict(rec)
    for k, v in out.items():
        if isinstance(v, dict):
            out[k] = {kk: ([dict(x) for x in vv] if isinstance(vv, list) else vv) for kk, vv in v.items()}
        elif isinstance(v, list):
            out[k] = [dict(x) if isinstance(x, dict) else x for x in v]
    return out


def is_relative_key(key: object) -> bool:
    """c-to-a.md's relative key: non-empty, no leading '/', no empty, '.' or '..' segment."""
    if not isinstance(key, str) or not key or key.startswith("/"):
        return False
    return all(seg not in ("", ".", "..") for seg in key.split("/"))


_BAD_DOB = ("19840230", "1984-06-17", "198406", "", "19841317", "1984061")
_BAD_STARTED = ("2026-11-03T09:15:00", "2026-02-30T10:00:00Z", "yesterday", "2026-11-03 09:15", "2026-11-03")
_BAD_SERIES_NO = ("", " 3", "3.0", "3a", "99999999999", "+", "\u0663")


def apply_defect(level: int, rec: dict[str, Any], kind: str, h: int) -> None:
    """Make ``rec`` (a live record) carry defect ``kind``; ``h`` picks the variant."""
    v = (h >> 3) % 6
    if kind.startswith("unknown_"):
        fname = kind.removeprefix("unknown_")
        values = UNKNOWN_CODES[fname]
        rec[fname] = values[(h >> 5) % len(values)]
        return
    link = LINK_FIELD[level]
    raw_obj = rec.get("object")
    obj: dict[str, Any] = raw_obj if isinstance(raw_obj, dict) else {"bucket": BUCKETS[0], "key": "v2/x.dcm"}
    if kind == "empty_mrn":
        ids = rec.get("identifiers")
        rec["identifiers"] = {**(ids if isinstance(ids, dict) else {"other": []}), "mrn": ""}
    elif kind == "bad_dob":
        rec["dob"] = _BAD_DOB[v % len(_BAD_DOB)]
    elif kind == "bad_started":
        rec["started"] = _BAD_STARTED[v % len(_BAD_STARTED)]
    elif kind == "bad_series_no":
        rec["series_no"] = _BAD_SERIES_NO[(h >> 5) % len(_BAD_SERIES_NO)]
    elif kind in ("empty_study_uid", "empty_series_uid", "empty_sop_uid"):
        rec[
            {"empty_study_uid": "study_instance_uid", "empty_series_uid": "series_instance_uid"}.get(
                kind, "sop_instance_uid"
            )
        ] = ""
    elif kind == "bad_key":
        key = str(obj.get("key") or "v2/x.dcm")
        head, _, tail = key.rpartition("/")
        variants = ("/" + key, f"{head}//{tail}", key + "/", f"{head}/./{tail}", f"{head}/../{tail}", "")
        rec["object"] = {**obj, "key": variants[v]}
    elif kind == "bucket_not_allowed":
        rec["object"] = {**obj, "bucket": NOT_ALLOWED_BUCKETS[v % len(NOT_ALLOWED_BUCKETS)]}
    elif kind == "empty_bucket":
        rec["object"] = {**obj, "bucket": ""}
    elif kind == "index_out_of_range":
        rec["index"] = 2147483648 if v % 2 else -2147483649
    elif kind == "bytes_out_of_range":
        rec["bytes"] = 9223372036854775808
    elif kind == "bad_link":
        assert link is not None
        current = str(rec.get(link) or "")
        rec[link] = (current.upper(), None, "not-a-uuid", current.replace("-", ""))[v % 4]
    elif kind == "wrong_type":
        _wrong_type(level, rec, v, obj)
    else:
        raise ValueError(f"unknown defect kind {kind!r}")


def _wrong_type(level: int, rec: dict[str, Any], v: int, obj: dict[str, Any]) -> None:
    if level == 0:
        mrn = rec.get("identifiers", {}).get("mrn", "MRN-1") if isinstance(rec.get("identifiers"), dict) else "MRN-1"
        rec["identifiers"] = (mrn, {"mrn": 48213, "other": []}, {"mrn": mrn, "other": []})[v % 3]
        if v % 3 == 2:
            rec["dob"] = 19840617
    elif level == 1:
        rec["started" if v % 2 else "study_instance_uid"] = 1793666537 if v % 2 else 1.2
    elif level == 2:
        n = rec.get("series_no")
        rec["series_no"] = int(n) if isinstance(n, str) and n.isdigit() else 3
    elif v % 3 == 0:
        rec["index"] = str(rec.get("index") or 17)
    elif v % 3 == 1:
        rec["bytes"] = str(rec.get("bytes") or 526614)
    else:
        rec["object"] = f"{obj.get('bucket')}/{obj.get('key')}"


__all__ = ["Catalogue", "Snapshot", "apply_defect", "is_relative_key", "level_of", "rfc3339_ms", "to_ms"]
