"""``python -m simulator_c.bench``: how fast the C simulator serves pages (no medsync code involved).

Measures in-process page generation + JSON encoding, then HTTP pages/s with one keep-alive
client following ``rel="next"`` through ``/files`` of a simulator in its own process (rate
limit off). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from simulator_c.client import spawn
from simulator_c.config import SimConfig
from simulator_c.model import Catalogue

_NEXT = re.compile(r'<([^>]+)>;\s*rel="next"')


def run(files: int = 1_000_000, page_size: int = 500, pages: int = 100) -> dict[str, Any]:
    """Serve ``pages`` pages of ``page_size`` files from a simulator holding ``files`` files."""
    fpa = 50
    cfg = SimConfig(participants=max(1, files // (2 * 4 * fpa)), visits_per_participant=2, acquisitions_per_visit=4,
                    files_per_acquisition=fpa, clock="manual")  # fmt: skip
    out: dict[str, Any] = {"files": cfg.total_files, "page_size": page_size}
    cat = Catalogue(cfg)
    snap = cat.pin("files", None, None)
    cpu0 = time.process_time()
    for page in range(1, pages + 1):
        json.dumps(cat.page(snap, page, page_size), ensure_ascii=False, check_circular=False).encode()
    out["inprocess_cpu_ms_per_page"] = round((time.process_time() - cpu0) / pages * 1000, 2)
    shape = ["--visits-per-participant", "2", "--acquisitions-per-visit", "4", "--files-per-acquisition", str(fpa)]
    args = ["--no-rate-limit", "--clock", "manual", "--participants", str(cfg.participants), *shape]
    with spawn("bench", *args) as child:
        out["subprocess_http"] = _http_pages(child.base_url, "bench", page_size, pages)
    return out


def _http_pages(base_url: str, token: str, page_size: int, pages: int) -> dict[str, Any]:
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
    path = f"{u.path}/files?page_size={page_size}"
    n = records = nbytes = 0
    t0 = time.perf_counter()
    try:
        while n < pages:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"simulator answered {resp.status}")
            records += len(json.loads(body))
            nbytes += len(body)
            n += 1
            m = _NEXT.search(resp.getheader("Link") or "")
            if m is None:
                break
            nxt = urlsplit(m.group(1))
            path = f"{nxt.path}?{nxt.query}"
    finally:
        conn.close()
    dt = time.perf_counter() - t0
    return {
        "pages_per_s": round(n / dt, 1),
        "records_per_s": round(records / dt),
        "mb_per_s": round(nbytes / dt / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON."""
    p = argparse.ArgumentParser(prog="python -m simulator_c.bench", description=__doc__)
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--page-size", type=int, default=500)
    p.add_argument("--pages", type=int, default=100)
    a = p.parse_args(argv)
    print(json.dumps(run(a.files, a.page_size, a.pages)))  # noqa: T201 (the tool's output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
