"""B's REST API and the ``/_sim/`` admin API as a transport-free request handler.

``Api.handle`` maps (method, path, query, headers, body) to a ``Response``; the HTTP
server only moves bytes. Keeping it socket-free lets benchmarks time page generation
alone and keeps fault decisions in one place.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, unquote

from simulator import timefmt
from simulator.config import FaultConfig
from simulator.model import Catalogue
from simulator.vocab import RESOURCES, mix, threshold

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
ADMIN_PREFIX = "/_sim"
M32 = 0xFFFFFFFF
_DIGITS = re.compile(r"[0-9]{1,7}")
_JSON_HEADERS = (("Content-Type", "application/json; charset=utf-8"),)


@dataclass
class Response:
    """What to send. ``drop`` (a FaultConfig.drop_mode) means: no proper HTTP response."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = _JSON_HEADERS
    drop: str | None = None
    delay: float = 0.0


class ApiError(Exception):
    """An error answered as B does: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> Response:
        body = json.dumps({"error": {"code": self.code, "message": self.message}}).encode()
        return Response(self.status, body, _JSON_HEADERS + self.headers)


def _json(obj: Any, status: int = 200) -> Response:
    # ensure_ascii=False: B sends UTF-8; check_circular off because records are plain trees (speed).
    body = json.dumps(obj, ensure_ascii=False, check_circular=False, separators=(",", ":")).encode()
    return Response(status, body)


@dataclass
class _Stats:
    requests: int = 0  # API requests received (admin excluded)
    authorized: int = 0
    cursor_requests: int = 0
    pages: int = 0
    records: int = 0
    admin_requests: int = 0
    cursor_expired_ttl: int = 0
    responses: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    per_second: Counter[int] = field(default_factory=Counter)  # API requests received per wall-clock second

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "authorized": self.authorized,
            "cursor_requests": self.cursor_requests,
            "pages": self.pages,
            "records": self.records,
            "admin_requests": self.admin_requests,
            "cursor_expired_ttl": self.cursor_expired_ttl,
            "responses": dict(self.responses),
            "faults": {k: self.faults.get(k, 0) for k in FAULT_KINDS},
            "endpoints": dict(self.endpoints),
            "per_second": {str(second): n for second, n in sorted(self.per_second.items())},
            "max_per_second": max(self.per_second.values(), default=0),
        }


FAULT_KINDS = ("drop", "error", "throttle", "slow", "expire", "rate_limit")


class Api:
    """Answers B's API under ``/api/v1`` and the admin API under ``/_sim`` for one catalogue."""

    def __init__(self, catalogue: Catalogue, api_key: str, faults: FaultConfig | None = None) -> None:
        if not api_key:
            raise ValueError("api_key must be non-empty")
        self.catalogue = catalogue
        self._key = api_key.encode()
        self._initial_faults = faults or FaultConfig()
        self._faults = self._initial_faults
        self._stats = _Stats()
        self._lock = threading.Lock()  # stats, fault counters and buckets; never held while paging
        self._buckets: dict[bytes, tuple[float, float]] = {}
        self._fault_n = 0  # API requests since the faults were set
        self._cursor_n = 0  # of those, requests carrying a cursor
        self._cursor_key = hashlib.sha256(b"cursor:" + str(catalogue.config.seed).encode()).digest()

    # ------------------------------------------------------------------ faults and stats

    @property
    def faults(self) -> FaultConfig:
        """Faults in force."""
        return self._faults

    def set_faults(self, config: FaultConfig | None = None, **fields: Any) -> FaultConfig:
        """Replace the faults in force: a FaultConfig, or its fields (unnamed ones off)."""
        if config is not None and fields:
            config = replace(config, **fields)
        new = config if config is not None else FaultConfig(**fields)
        with self._lock:
            self._faults = new
            self._buckets.clear()
            # "every k-th request" counts from the moment the faults were set.
            self._fault_n = 0
            self._cursor_n = 0
        return new

    def stats(self) -> dict[str, Any]:
        """Counters: requests, responses by status, faults injected by kind, pages, records..."""
        with self._lock:
            return self._stats.to_json()

    def reset_stats(self) -> None:
        """Zero every counter (the every-k-th fault schedule restarts too)."""
        with self._lock:
            self._stats = _Stats()
            self._fault_n = 0
            self._cursor_n = 0

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
        injected = sum(self._stats.faults[k] for k in FAULT_KINDS if k != "rate_limit")
        return injected < cap

    def _pre_faults(self) -> Response | float:
        """A fault response to send instead of serving, or the seconds to delay serving."""
        f = self._faults
        with self._lock:
            self._stats.authorized += 1
            self._fault_n += 1
            n = self._fault_n
            if f.revoke_key_after and n > f.revoke_key_after:
                return ApiError(401, "unauthorized", "the API key was revoked").response()
            if self._budget_left():
                if self._hits(f.drop_every, f.drop_fraction, n, 0xD0):
                    self._stats.faults["drop"] += 1
                    self._stats.responses["dropped"] += 1
                    return Response(200, b"", drop=f.drop_mode)
                if self._hits(f.error_every, f.error_fraction, n, 0xE0):
                    self._stats.faults["error"] += 1
                    return ApiError(f.error_status, "unavailable", "service temporarily unavailable").response()
                if self._hits(f.throttle_every, f.throttle_fraction, n, 0x70):
                    self._stats.faults["throttle"] += 1
                    return _throttled(f.retry_after)
            if f.rate_limit_per_second is not None:
                wait = self._take_token(f.rate_limit_per_second)
                if wait > 0:
                    self._stats.faults["rate_limit"] += 1
                    return _throttled(max(1, math.ceil(wait)))
            if self._budget_left() and self._hits(f.slow_every, f.slow_fraction, n, 0x51):
                self._stats.faults["slow"] += 1
                return f.slow_seconds
        return 0.0

    def _take_token(self, rate: float) -> float:
        """Token bucket (burst = max(1, rate)); 0 if allowed, else seconds until a token."""
        burst = max(1.0, rate)
        now = time.monotonic()
        tokens, last = self._buckets.get(self._key, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1:
            self._buckets[self._key] = (tokens - 1, now)
            return 0.0
        self._buckets[self._key] = (tokens, now)
        return (1 - tokens) / rate

    # ------------------------------------------------------------------ entry point

    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request. Never raises; unexpected errors become a 500 JSON error."""
        try:
            if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
                resp = self._handle_api(method, path[len(API_PREFIX) :], query, headers)
            elif path.startswith(ADMIN_PREFIX + "/"):
                resp = self._handle_admin(method, path[len(ADMIN_PREFIX) + 1 :], headers, body)
            else:
                resp = ApiError(404, "not_found", f"no such path: {path}").response()
        except ApiError as exc:
            resp = exc.response()
        except Exception:  # a simulator bug must still produce an HTTP answer
            log.exception("simulator failed on %s %s", method, path)
            resp = ApiError(500, "internal", "simulator error").response()
        if not resp.drop:
            with self._lock:
                self._stats.responses[str(resp.status)] += 1
        return resp

    def _auth(self, headers: Mapping[str, str]) -> None:
        given = headers.get("X-API-Key")
        if not given or not hmac.compare_digest(given.encode(), self._key):
            raise ApiError(401, "unauthorized", "missing or invalid X-API-Key")

    # ------------------------------------------------------------------ B's API

    def _handle_api(self, method: str, sub: str, query: str, headers: Mapping[str, str]) -> Response:
        with self._lock:
            self._stats.requests += 1
            self._stats.per_second[int(time.time())] += 1
        self._auth(headers)
        pre = self._pre_faults()
        if isinstance(pre, Response):
            return pre
        if method != "GET":
            raise ApiError(405, "method_not_allowed", "B's API is read-only")
        parts = [unquote(p) for p in sub.strip("/").split("/")] if sub.strip("/") else []
        if parts == ["counts"]:
            resp = _json(self.catalogue.counts())
            endpoint = "counts"
        elif len(parts) == 1 and parts[0] in RESOURCES:
            resp = self._list(parts[0], query)
            endpoint = parts[0]
        elif len(parts) == 2 and parts[0] in RESOURCES:
            rec = self.catalogue.get(parts[0], parts[1])
            if rec is None:
                raise ApiError(404, "not_found", f"no {parts[0]} record with that id")
            resp = _json(rec)
            endpoint = parts[0] + "/{id}"
        else:
            raise ApiError(404, "not_found", f"no such path: {API_PREFIX}{sub}")
        resp.delay = pre
        with self._lock:
            self._stats.endpoints[endpoint] += 1
        return resp

    def _list(self, resource: str, query: str) -> Response:
        q = parse_qs(query, keep_blank_values=True)

        def one(name: str) -> str | None:
            vals = q.get(name)
            if vals is None:
                return None
            if len(vals) > 1:
                raise ApiError(400, "invalid_parameter", f"{name} given more than once")
            return vals[0]

        since = _ts_param("updated_since", one("updated_since"))
        before = _ts_param("updated_before", one("updated_before"))
        include_deleted = _bool_param("include_deleted", one("include_deleted"))
        limit_s = one("limit")
        limit = 100
        if limit_s is not None:
            if not _DIGITS.fullmatch(limit_s) or not 1 <= int(limit_s) <= 1000:
                raise ApiError(400, "invalid_parameter", "limit must be an integer from 1 to 1000")
            limit = int(limit_s)
        filters = _filter_hash(resource, since, before, include_deleted)
        cursor = one("cursor")
        after = None
        if cursor is not None:
            after = self._decode_cursor(cursor, filters)
        records, last = self.catalogue.page(
            resource, since=since, before=before, include_deleted=include_deleted, limit=limit, after=after
        )
        next_cursor = self._encode_cursor(last, filters) if last is not None else None
        with self._lock:
            self._stats.pages += 1
            self._stats.records += len(records)
        return _json({"data": records, "next_cursor": next_cursor})

    def _encode_cursor(self, last: tuple[int, str], filters: str) -> str:
        payload = json.dumps(
            {"t": last[0], "id": last[1], "f": filters, "iat": self.catalogue.now_us()}, separators=(",", ":")
        ).encode()
        p64 = base64.urlsafe_b64encode(payload).rstrip(b"=")
        sig = base64.urlsafe_b64encode(hmac.digest(self._cursor_key, p64, "sha256")[:12]).rstrip(b"=")
        return (p64 + b"." + sig).decode()

    def _decode_cursor(self, cursor: str, filters: str) -> tuple[int, str]:
        bad = ApiError(400, "invalid_cursor", "cursor is not one this server issued")
        p64, _, sig = cursor.encode().partition(b".")
        want = base64.urlsafe_b64encode(hmac.digest(self._cursor_key, p64, "sha256")[:12]).rstrip(b"=")
        if not hmac.compare_digest(sig, want):
            raise bad
        try:
            data = json.loads(base64.urlsafe_b64decode(p64 + b"=" * (-len(p64) % 4)))
            t, rid, f, iat = int(data["t"]), str(data["id"]), str(data["f"]), int(data["iat"])
        except (ValueError, KeyError, TypeError) as exc:
            raise bad from exc
        if f != filters:
            raise ApiError(400, "invalid_cursor", "cursor was issued for other filters; repeat them unchanged")
        now = self.catalogue.now_us()
        ttl = self.catalogue.config.cursor_ttl_seconds
        expired_msg = "cursor expired; resume with updated_since set to the last updated_at received"
        fc = self._faults
        with self._lock:
            self._stats.cursor_requests += 1
            self._cursor_n += 1
            m = self._cursor_n
            if now - iat > ttl * timefmt.US_PER_S:
                self._stats.cursor_expired_ttl += 1
                raise ApiError(400, "cursor_expired", expired_msg)
            if self._budget_left() and self._hits(fc.expire_every, fc.expire_fraction, m, 0xC0):
                self._stats.faults["expire"] += 1
                raise ApiError(400, "cursor_expired", expired_msg)
        return t, rid

    # ------------------------------------------------------------------ admin API

    def _handle_admin(self, method: str, name: str, headers: Mapping[str, str], body: bytes) -> Response:
        with self._lock:
            self._stats.admin_requests += 1
        self._auth(headers)
        if name.startswith("files/") and method == "GET":
            try:
                data = self.catalogue.file_bytes(unquote(name[len("files/") :]))
            except KeyError:
                raise ApiError(404, "not_found", "no such image") from None
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
        if method == "GET" and name in ("faults", "clock", "stats"):
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
            "config": lambda _a: {
                "config": self.catalogue.config.to_json(),
                "faults": self._faults.to_json(),
                "now": timefmt.render_utc(self.catalogue.now_us()),
            },
        }

    def _admin_mutate(self, a: dict[str, Any]) -> Any:
        c = self.catalogue
        op = a.get("op")
        if op == "update":
            return {"record": c.update(a["resource"], a["id"], remove=a.get("remove", ()), **a.get("fields", {}))}
        if op == "delete":
            return {"ids": c.delete(a["resource"], a["id"])}
        if op == "undelete":
            return {"ids": c.undelete(a["resource"], a["id"], cascade=bool(a.get("cascade", False)))}
        if op == "add":
            return {"record": c.add(a["resource"], a.get("parent_id"), **a.get("fields", {}))}
        if op == "add_patient_tree":
            return c.add_patient_tree(a.get("studies"), a.get("series"), a.get("images"), **a.get("fields", {}))
        if op == "mutate_fraction":
            return c.mutate_fraction(float(a["fraction"]), int(a.get("seed", 0)))
        if op == "make_invalid":
            return {"record": c.make_invalid(a["resource"], a["id"], a["kind"])}
        if op == "repair":
            return {"record": c.repair(a["resource"], a["id"])}
        if op == "get":
            return {"record": c.get(a["resource"], a["id"])}
        raise ValueError(
            "op must be update, delete, undelete, add, add_patient_tree, mutate_fraction, make_invalid, repair or get"
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
        return {"now": timefmt.render_utc(self.catalogue.now_us())}

    def _admin_stats(self, a: dict[str, Any]) -> Any:
        out = self.stats()
        if a.get("reset"):
            self.reset_stats()
        return out

    def _admin_reset(self, _a: dict[str, Any]) -> Any:
        self.reset()
        return {"ok": True}


def _throttled(retry_after: int) -> Response:
    return ApiError(
        429, "rate_limited", "too many requests; retry after Retry-After seconds", (("Retry-After", str(retry_after)),)
    ).response()


def _ts_param(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return timefmt.parse(value)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an RFC 3339 date-time with offset") from None


def _bool_param(name: str, value: str | None) -> bool:
    if value is None:
        return False
    v = value.lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ApiError(400, "invalid_parameter", f"{name} must be true or false")


def _filter_hash(resource: str, since: int | None, before: int | None, include_deleted: bool) -> str:
    return hashlib.sha256(f"{resource}|{since}|{before}|{int(include_deleted)}".encode()).hexdigest()[:16]
