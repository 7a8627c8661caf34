"""``python -m simulator``: serve a simulated service B until SIGINT/SIGTERM.

Prints exactly one line to stdout once listening: ``{"base_url": ..., "admin_url": ..., "pid": ...}``.
The API key comes from ``--api-key`` or, better (no process-list exposure), ``$BSIM_API_KEY``.
B's documented rate limit (20 requests/s per key) is on unless ``--no-rate-limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from simulator.config import FaultConfig, SimConfig
from simulator.server import BSimulator


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--api-key", default=os.environ.get("BSIM_API_KEY"), help="default: $BSIM_API_KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--studies-per-patient", type=int, default=2)
    p.add_argument("--series-per-study", type=int, default=3)
    p.add_argument("--images-per-series", type=int, default=10)
    p.add_argument("--base-time", help="RFC 3339; base data lies in the history before it (default: now)")
    p.add_argument("--clock", choices=("real", "manual"), default="real")
    p.add_argument("--history-days", type=float, default=30.0)
    p.add_argument("--plain", action="store_true", help="no awkward text, NULs, long text or nulls")
    p.add_argument("--orphan-fraction", type=float)
    p.add_argument("--invalid-fraction", type=float)
    p.add_argument("--unknown-enum-fraction", type=float)
    p.add_argument("--rate-limit", type=float, default=20.0, help="requests/s per key (default 20, as B)")
    p.add_argument("--no-rate-limit", action="store_true")
    p.add_argument("--config-json", help="JSON object of further SimConfig fields")
    p.add_argument("--faults-json", help="JSON object of FaultConfig fields")
    return p


def _build(args: argparse.Namespace) -> BSimulator:
    cfg: dict[str, Any] = {
        "seed": args.seed,
        "patients": args.patients,
        "studies_per_patient": args.studies_per_patient,
        "series_per_study": args.series_per_study,
        "images_per_series": args.images_per_series,
        "base_time": args.base_time,
        "clock": args.clock,
        "history_seconds": args.history_days * 86400,
    }
    for name in ("orphan_fraction", "invalid_fraction", "unknown_enum_fraction"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.config_json:
        extra = json.loads(args.config_json)
        if "invalid_kinds" in extra and extra["invalid_kinds"] is not None:
            extra["invalid_kinds"] = tuple(extra["invalid_kinds"])
        cfg.update(extra)
    config = SimConfig.plain(**cfg) if args.plain else SimConfig(**cfg)
    faults: dict[str, Any] = json.loads(args.faults_json) if args.faults_json else {}
    if not args.no_rate_limit:
        faults.setdefault("rate_limit_per_second", args.rate_limit)
    return BSimulator(config, args.api_key, host=args.host, port=args.port, faults=FaultConfig(**faults))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.api_key:
        _parser().error("give --api-key or set BSIM_API_KEY")
    sim = _build(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sim.start()
    line = {"base_url": sim.base_url, "admin_url": sim.admin_url, "pid": os.getpid()}
    print(json.dumps(line), flush=True)  # noqa: T201 (the CLI's one line of output)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
