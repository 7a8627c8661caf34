"""``python -m simulator.bench``: how fast the simulator serves pages (no medsync code involved).

Measures in-process page generation + JSON encoding, then HTTP pages/s with one keep-alive
client paging ``/images`` by cursor. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from simulator.client import spawn
from simulator.config import SimConfig
from simulator.server import BSimulator


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(images: int = 1_000_000, limit: int = 1000, pages: int = 300) -> dict[str, Any]:
    """Serve ``pages`` pages of ``limit`` images from a simulator holding ``images`` images."""
    ips = 50
    cfg = SimConfig(patients=max(1, images // (5 * 4 * ips)), studies_per_patient=5, series_per_study=4,
                    images_per_series=ips, clock="manual")  # fmt: skip
    out: dict[str, Any] = {"images": cfg.total_images, "limit": limit}
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    with BSimulator(cfg, api_key="bench") as sim:
        out["start_s"] = round(time.perf_counter() - t0, 4)
        after = None
        cpu0, n = time.process_time(), 0
        while n < pages:
            recs, after = sim.page("images", limit=limit, after=after)
            json.dumps({"data": recs, "next_cursor": None}, ensure_ascii=False, check_circular=False).encode()
            n += 1
            if after is None:
                break
        out["inprocess_cpu_ms_per_page"] = round((time.process_time() - cpu0) / n * 1000, 2)
        out["inprocess_http"] = _http_pages(sim.base_url, "bench", limit, pages)
    out["max_rss_growth_mb"] = round(_rss_mb() - rss0, 1)
    # The realistic set-up: the simulator in its own process (as the CLI runs it), one client.
    args = ["--no-rate-limit", "--clock", "manual", "--patients", str(cfg.patients), "--studies-per-patient", "5",
            "--series-per-study", "4", "--images-per-series", str(ips)]  # fmt: skip
    with spawn("bench", *args) as child:
        out["subprocess_http"] = _http_pages(child.base_url, "bench", limit, pages)
    return out


def _http_pages(base_url: str, key: str, limit: int, pages: int) -> dict[str, Any]:
    """Page /images by cursor over one keep-alive connection; pages/s and records/s."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
    cursor, n, nbytes = None, 0, 0
    t1 = time.perf_counter()
    while n < pages:
        path = f"{u.path}/images?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        conn.request("GET", path, headers={"X-API-Key": key})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {body[:200]!r}")
        nbytes += len(body)
        cursor = json.loads(body)["next_cursor"]
        n += 1
        if cursor is None:
            break
    dt = time.perf_counter() - t1
    conn.close()
    return {"pages_per_s": round(n / dt, 1), "records_per_s": round(n * limit / dt), "mean_page_bytes": nbytes // n}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: prints the measurements as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m simulator.bench")
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--pages", type=int, default=300)
    a = p.parse_args(argv)
    print(json.dumps(run(a.images, a.limit, a.pages)))  # noqa: T201 (the tool's output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
