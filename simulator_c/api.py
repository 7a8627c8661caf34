"""C's REST API v2 and the ``/_sim/`` admin API as a transport-free request handler.

``Api.handle`` maps (method, path, query, headers, body) to a ``Response``; the HTTP server
only moves bytes. Order of checks, as C's README says: the bearer token (401, 403), then the
rate limit (429), then injected faults, then the request itself (404, 400, 410, 200).
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from simulator.api import ApiError, Response
from simulator.vocab import mix, threshold
from simulator_c.config import FaultConfig
from simulator_c.model import Catalogue, Snapshot, rfc3339_ms
from simulator_c.vocab import M32, RESOURCES

log = logging.getLogger(__name__)

API_PREFIX = "/v2"
ADMIN_PREFIX = "/_sim"
REALM = 'Bearer realm="c-archive"'
READ_SCOPE = "read"
MAX_MILLIS = 253402300799999
LIST_PARAMS = frozenset({"modified_from", "modified_to", "page", "page_size", "snapshot"})
_DECIMAL = re.compile(r"[0-9]{1,20}", re.ASCII)
_SNAPSHOT = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)
_JSON = (("Content-Type", "application/json; charset=utf-8"),)
_GATEWAY_HTML = b"<html><head><title>%d</title></head><body><h1>%d %s</h1><hr>lb</body></html>\n"
FAULT_KINDS = ("drop", "gateway", "internal", "unavailable", "throttle", "slow", "expire", "rate_limit")


def http_date(ms: int) -> str:
    """RFC 9110 IMF-fixdate of an instant (whole seconds, rounded down)."""
    return format_datetime(datetime.fromtimestamp(ms // 1000, UTC), usegmt=True)


def _json(obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    # ensure_ascii=False: C answers UTF-8; records are plain trees (no circular check needed).
    body = json.dumps(obj, ensure_ascii=False, check_circular=False, separators=(",", ":")).encode()
    return Response(status, body, _JSON + headers)


@dataclass
class _Stats:
    requests: int = 0  # API requests received (admin excluded)
    authorized: int = 0  # of those, past 401/403
    pages: int = 0
    records: int = 0
    admin_requests: int = 0
    snapshots_issued: int = 0
    snapshots_gone: int = 0  # 410 for an expired, forgotten or never issued snapshot (not forced)
    peak_requests_per_second: int = 0
    responses: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    per_second: collections.OrderedDict[int, int] = field(default_factory=collections.OrderedDict)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "authorized": self.authorized,
            "pages": self.pages,
            "records": self.records,
            "admin_requests": self.admin_requests,
            "snapshots_issued": self.snapshots_issued,
            "snapshots_gone": self.snapshots_gone,
            "peak_requests_per_second": self.peak_requests_per_second,
            "requests_per_second": {str(k): v for k, v in self.per_second.items()},
            "responses": dict(self.responses),
            "faults": {k: self.faults.get(k, 0) for k in FAULT_KINDS},
            "endpoints": dict(self.endpoints),
        }


class Api:
    """Answers C's API under ``/v2`` (and 404 for other paths) and the admin API under ``/_sim``.

    ``tokens`` maps further bearer tokens to their scopes, e.g. ``{"no-read": ()}`` for a token
    that is valid but answered 403. ``token`` has the ``read`` scope and drives the admin API.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        token: str,
        faults: FaultConfig | None = None,
        tokens: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        if not token:
            raise ValueError("token must be non-empty")
        self.catalogue = catalogue
        self._admin_token = token.encode()
        self._tokens: dict[bytes, frozenset[str]] = {token.encode(): frozenset({READ_SCOPE})}
        for extra, scopes in (tokens or {}).items():
            self._tokens[extra.encode()] = frozenset(scopes)
        self._initial_faults = faults or FaultConfig()
        self._faults = self._initial_faults
        self._stats = _Stats()
        self._lock = threading.Lock()  # stats, fault counters, limiter; never held while paging
        self._recent: dict[bytes, collections.deque[float]] = {}  # per token: accepted requests, last 1 s
        self._fault_n = 0
        self.root_url = "http://127.0.0.1"  # set by the server once it listens

    # ------------------------------------------------------------------ faults and stats

    @property
    def faults(self) -> FaultConfig:
        """Faults in force."""
        return self._faults

    def set_faults(self, config: FaultConfig | None = None, **fields: Any) -> FaultConfig:
        """Replace the faults in force: a FaultConfig, or its fields (others at their defaults:
        no injected faults, C's 10 requests/s limit on; ``rate_limit=None`` turns it off)."""
        if config is not None and fields:
            config = replace(config, **fields)
        new = config if config is not None else FaultConfig(**fields)
        with self._lock:
            self._faults = new
            self._recent.clear()
            self._fault_n = 0  # "every k-th request" counts from the moment the faults were set
        return new

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset (see ``_Stats``)."""
        with self._lock:
            return self._stats.to_json()

    def reset_stats(self) -> None:
        """Zero every counter (the every-k-th fault schedule restarts too)."""
        with self._lock:
            self._stats = _Stats()
            self._fault_n = 0

    def reset(self) -> None:
        """Catalogue as constructed, faults as at start, counters zero."""
        self.catalogue.reset()
        self.set_faults(self._initial_faults)
        self.reset_stats()

    def _hits(self, every: int, fraction: float, n: int, salt: int) -> bool:
        if every > 0 and n % every == 0:
            return True
        return fraction > 0 and mix(self._faults.seed * 0x10001 ^ salt ^ (n << 8)) & M32 < threshold(fraction)

    def _budget_left(self) -> bool:
        cap = self._faults.max_faults
        if cap is None:
            return True
        return sum(self._stats.faults[k] for k in FAULT_KINDS if k != "rate_limit") < cap

    def _admit(self, token: bytes) -> Response | None:
        """C's limit: at most ``rate_limit`` accepted requests per token in any one second."""
        f = self._faults
        mono = time.monotonic()
        with self._lock:
            self._stats.authorized += 1
            dq = self._recent.setdefault(token, collections.deque())
            while dq and dq[0] <= mono - 1.0:
                dq.popleft()
            if f.rate_limit is not None and len(dq) >= f.rate_limit:
                self._stats.faults["rate_limit"] += 1
                wait = dq[0] + 1.0 - mono
                return _retry_later(
                    429, "rate_limited", f"{f.rate_limit} requests per second per token", self._now(), wait
                )
            dq.append(mono)
            self._stats.peak_requests_per_second = max(self._stats.peak_requests_per_second, len(dq))
            sec = int(time.time())
            per = self._stats.per_second
            per[sec] = per.get(sec, 0) + 1
            while len(per) > 120:
                per.popitem(last=False)
        return None

    def _unadmit(self, token: bytes) -> None:
        """A 429 does not count toward the limit."""
        with self._lock:
            dq = self._recent.get(token)
            if dq:
                dq.pop()

    def _pre_faults(self, token: bytes) -> Response | float:
        """An injected fault to answer instead, or the seconds to delay the answer."""
        f = self._faults
        with self._lock:
            self._fault_n += 1
            n = self._fault_n
            if not self._budget_left():
                return 0.0
            if self._hits(f.drop_every, f.drop_fraction, n, 0xD0):
                self._stats.faults["drop"] += 1
                self._stats.responses["dropped"] += 1
                return Response(200, b"", drop=f.drop_mode)
            if self._hits(f.gateway_every, f.gateway_fraction, n, 0x6A):
                self._stats.faults["gateway"] += 1
                return _gateway(f.gateway_status, f.gateway_body)
            if self._hits(f.internal_every, f.internal_fraction, n, 0x1E):
                self._stats.faults["internal"] += 1
                return ApiError(500, "internal", "internal error").response()
            if self._hits(f.unavailable_every, f.unavailable_fraction, n, 0xE0):
                self._stats.faults["unavailable"] += 1
                if f.unavailable_retry_after is None:
                    return ApiError(503, "unavailable", "try again later").response()
                return _retry_later(503, "unavailable", "try again later", self._now(), f.unavailable_retry_after)
            throttle = self._hits(f.throttle_every, f.throttle_fraction, n, 0x70)
            if throttle:
                self._stats.faults["throttle"] += 1
            elif self._hits(f.slow_every, f.slow_fraction, n, 0x51):
                self._stats.faults["slow"] += 1
                return f.slow_seconds
        if throttle:
            self._unadmit(token)
            return _retry_later(
                429, "rate_limited", "10 requests per second per token", self._now(), f.throttle_retry_after
            )
        return 0.0

    def _now(self) -> int:
        return self.catalogue.now_ms()

    # ------------------------------------------------------------------ entry point

    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request. Never raises; unexpected errors become a 500 ``internal``."""
        try:
            if path.startswith(ADMIN_PREFIX + "/"):
                resp = self._handle_admin(method, path[len(ADMIN_PREFIX) + 1 :], headers, body)
            else:
                resp = self._handle_api(method, path, query, headers)
        except ApiError as exc:
            resp = exc.response()
        except Exception:  # a simulator bug must still produce an HTTP answer
            log.exception("simulator failed on %s %s", method, path)
            resp = ApiError(500, "internal", "simulator error").response()
        if not resp.drop:
            # Every answer carries Date, by the simulator's clock: Retry-After is judged by it.
            resp.headers = (*resp.headers, ("Date", http_date(self._now())))
            with self._lock:
                self._stats.responses[str(resp.status)] += 1
        return resp

    def _auth(self, headers: Mapping[str, str]) -> bytes:
        given = headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        unauth = ApiError(401, "unauthenticated", "missing or invalid bearer token", (("WWW-Authenticate", REALM),))
        if scheme.lower() != "bearer" or not token or token != token.strip() or " " in token:
            raise unauth
        tok = token.encode()
        for known, scopes in self._tokens.items():
            if hmac.compare_digest(tok, known):
                if READ_SCOPE not in scopes:
                    raise ApiError(403, "insufficient_scope", "token lacks scope read")
                return known
        raise unauth

    # ------------------------------------------------------------------ C's API

    def _handle_api(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Response:
        with self._lock:
            self._stats.requests += 1
        token = self._auth(headers)
        limited = self._admit(token)
        if limited is not None:
            return limited
        pre = self._pre_faults(token)
        if isinstance(pre, Response):
            return pre
        if method != "GET":
            raise ApiError(405, "method_not_allowed", "C's API is read-only: GET only", (("Allow", "GET"),))
        if not path.startswith(API_PREFIX + "/"):
            raise ApiError(404, "not_found", "no such path")
        parts = [unquote(p) for p in path[len(API_PREFIX) + 1 :].split("/")]
        if parts == ["stats"]:
            self._params(query, frozenset())
            resp = _json(self.catalogue.counts())
            endpoint = "stats"
        elif len(parts) == 1 and (parts[0] in RESOURCES or parts[0] == "deletions"):
            resp = self._list(parts[0], query, headers)
            endpoint = parts[0]
        elif len(parts) == 2 and parts[0] in RESOURCES:
            self._params(query, frozenset())
            rec = self.catalogue.get(parts[0], parts[1])
            if rec is None:
                raise ApiError(404, "not_found", f"no {parts[0].removesuffix('s')} with that uuid")
            resp = _json(rec)
            endpoint = parts[0] + "/{uuid}"
        else:
            raise ApiError(404, "not_found", "no such path")
        resp.delay = pre
        with self._lock:
            self._stats.endpoints[endpoint] += 1
        return resp

    @staticmethod
    def _params(query: str, allowed: frozenset[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ApiError(400, "invalid_parameter", "malformed query string") from None
        for name, value in pairs:
            if name not in allowed:
                raise ApiError(400, "invalid_parameter", f"unknown parameter {name!r}")
            if name in out:
                raise ApiError(400, "invalid_parameter", f"{name} given more than once")
            out[name] = value
        return out

    def _list(self, resource: str, query: str, headers: Mapping[str, str]) -> Response:
        q = self._params(query, LIST_PARAMS)
        frm = _int_param(q, "modified_from", 0, MAX_MILLIS)
        to = _int_param(q, "modified_to", 0, MAX_MILLIS)
        page = _int_param(q, "page", 1, None) or 1
        size = _int_param(q, "page_size", 1, 500) or 100
        if frm is not None and to is not None and frm > to:
            raise ApiError(400, "invalid_parameter", "modified_from must not be greater than modified_to")
        sid = q.get("snapshot")
        cat = self.catalogue
        if sid is not None:
            if not _SNAPSHOT.fullmatch(sid):
                raise ApiError(400, "invalid_parameter", "snapshot is not a snapshot id")
            snap = self._use_snapshot(sid, resource, frm, to)
        else:
            snap = cat.pin(resource, frm, to)
        records = cat.page(snap, page, size)
        has_next = page * size < snap.total
        f = self._faults
        number = cat.issue(snap) if has_next and snap.number == 0 else 0
        with self._lock:
            if number:
                self._stats.snapshots_issued += 1
                if f.expire_every and number % f.expire_every == 0 and self._budget_left():
                    snap.expire_after_pages = f.expire_after_pages
            snap.pages_served += 1
        extra: list[tuple[str, str]] = [("X-Total-Count", str(snap.total))]
        if has_next:
            params: dict[str, Any] = {}
            for name in ("modified_from", "modified_to", "page_size"):
                if name in q:
                    params[name] = q[name]
            params["page"] = page + 1
            params["snapshot"] = snap.id
            host = headers.get("Host") or self.root_url.removeprefix("http://")
            extra.append(("Link", f'<http://{host}{API_PREFIX}/{resource}?{urlencode(params)}>; rel="next"'))
        with self._lock:
            self._stats.pages += 1
            self._stats.records += len(records)
        return _json(records, headers=tuple(extra))

    def _use_snapshot(self, sid: str, resource: str, frm: int | None, to: int | None) -> Snapshot:
        gone = ApiError(410, "snapshot_expired", "snapshot expired; request the window again without snapshot")
        snap = self.catalogue.snapshot(sid)
        if snap is None:
            with self._lock:
                self._stats.snapshots_gone += 1
            raise gone
        if snap.resource != resource or snap.modified_from != frm or snap.modified_to != to:
            raise ApiError(400, "snapshot_mismatch", "snapshot was pinned for another resource or other bounds")
        if snap.expire_after_pages is not None and snap.pages_served >= snap.expire_after_pages:
            with self._lock:
                self._stats.faults["expire"] += 1
            self.catalogue.forget_snapshot(sid)
            raise gone
        return snap

    # ------------------------------------------------------------------ admin API

    def _handle_admin(self, method: str, name: str, headers: Mapping[str, str], body: bytes) -> Response:
        with self._lock:
            self._stats.admin_requests += 1
        if self._auth(headers) != self._admin_token:
            raise ApiError(403, "insufficient_scope", "the admin API takes the simulator's own token")
        if name.startswith("files/") and method == "GET":
            try:
                data = self.catalogue.file_bytes(unquote(name[len("files/") :]))
            except KeyError:
                raise ApiError(404, "not_found", "no such file") from None
            return Response(200, data, (("Content-Type", "application/dicom"),))
        handler = self._admin_routes().get(name)
        if handler is None:
            raise ApiError(404, "not_found", f"no admin endpoint {name!r}")
        if method not in ("GET", "POST"):
            raise ApiError(405, "method_not_allowed", "admin endpoints take POST (or GET)")
        try:
            args = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise ApiError(400, "invalid_json", str(exc)) from None
        if not isinstance(args, dict):
            raise ApiError(400, "invalid_json", "body must be a JSON object")
        if method == "GET":
            args = {"_read": True}  # a GET reads, never changes
        try:
            return _json(handler(args))
        except KeyError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None

    def _admin_routes(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "mutate": self._admin_mutate,
            "faults": self._admin_faults,
            "clock": self._admin_clock,
            "stats": self._admin_stats,
            "reset": self._admin_reset,
            "snapshots": self._admin_snapshots,
            "defects": lambda a: {"defects": self.catalogue.defects(a["resource"])},
            "objects": lambda _a: {
                "objects": [
                    {"bucket": b, "key": k, "uuid": u} for (b, k), u in self.catalogue.iter_objects(include_moved=True)
                ]
            },
            "config": lambda _a: {
                "config": self.catalogue.config.to_json(),
                "faults": self._faults.to_json(),
                "now": rfc3339_ms(self._now()),
            },
        }

    def _admin_mutate(self, a: dict[str, Any]) -> Any:
        if a.pop("_read", False):
            raise ValueError("mutate takes POST")
        c = self.catalogue
        op = a.get("op")
        if op == "update":
            return {"record": c.update(a["resource"], a["uuid"], remove=a.get("remove", ()), **a.get("fields", {}))}
        if op == "delete":
            return {"item": c.delete(a["resource"], a["uuid"])}
        if op in ("restore", "undelete"):
            return {"record": c.restore(a["resource"], a["uuid"])}
        if op == "move":
            return {"record": c.move(a["resource"], a["uuid"], a["parent"])}
        if op == "merge_participants":
            return c.merge_participants(a["source"], a["target"])
        if op == "move_file":
            return {"record": c.move_file(a["uuid"], a.get("bucket"))}
        if op == "add":
            return {"record": c.add(a["resource"], a.get("parent"), **a.get("fields", {}))}
        if op == "add_participant_tree":
            return c.add_participant_tree(a.get("visits"), a.get("acquisitions"), a.get("files"), **a.get("fields", {}))
        if op == "mutate_fraction":
            return c.mutate_fraction(float(a["fraction"]), int(a.get("seed", 0)))
        if op == "make_invalid":
            return {"record": c.make_invalid(a["resource"], a["uuid"], a["kind"])}
        if op == "repair":
            return {"record": c.repair(a["resource"], a["uuid"])}
        if op == "get":
            return {"record": c.get(a["resource"], a["uuid"])}
        if op == "uuid":
            return {"uuid": c.uuid(a["resource"], int(a["index"]))}
        raise ValueError(
            "op must be update, delete, restore, move, merge_participants, move_file, add, "
            "add_participant_tree, mutate_fraction, make_invalid, repair, get or uuid"
        )

    def _admin_faults(self, a: dict[str, Any]) -> Any:
        if not a.pop("_read", False):
            self.set_faults(**a)
        return {"faults": self._faults.to_json()}

    def _admin_clock(self, a: dict[str, Any]) -> Any:
        if "advance" in a:
            self.catalogue.advance(float(a["advance"]))
        if "set_now" in a:
            self.catalogue.set_now(a["set_now"])
        now = self._now()
        return {"now": rfc3339_ms(now), "now_ms": now}

    def _admin_stats(self, a: dict[str, Any]) -> Any:
        out = self.stats()
        if a.get("reset"):
            self.reset_stats()
        return out

    def _admin_reset(self, _a: dict[str, Any]) -> Any:
        self.reset()
        return {"ok": True}

    def _admin_snapshots(self, a: dict[str, Any]) -> Any:
        expired = self.catalogue.expire_snapshots() if a.get("expire_all") else 0
        return {"held": self.catalogue.snapshots_held, "expired": expired}


def _int_param(q: Mapping[str, str], name: str, lo: int, hi: int | None) -> int | None:
    value = q.get(name)
    if value is None:
        return None
    if not _DECIMAL.fullmatch(value):
        raise ApiError(400, "invalid_parameter", f"{name} must be a decimal integer")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, "invalid_parameter", f"{name} must be {rng}")
    return n


def _retry_later(status: int, code: str, message: str, now_ms: int, seconds: float) -> Response:
    """An error with ``Retry-After`` as an HTTP-date at least ``seconds`` after the Date sent."""
    when = (now_ms // 1000 + max(0, math.ceil(seconds))) * 1000
    if seconds > 0 and when - now_ms < seconds * 1000:
        when += 1000
    return ApiError(status, code, message, (("Retry-After", http_date(when)),)).response()


def _gateway(status: int, body: str) -> Response:
    phrase = "Bad Gateway" if status == 502 else "Gateway Timeout"
    if body == "empty":
        return Response(status, b"", ())
    return Response(status, _GATEWAY_HTML % (status, status, phrase.encode()), (("Content-Type", "text/html"),))
