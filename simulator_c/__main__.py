"""``python -m simulator_c``: serve a simulated service C until SIGINT/SIGTERM.

Prints exactly one line to stdout once listening: ``{"base_url": ..., "admin_url": ..., "pid": ...}``.
The token comes from ``--token`` or, better (no process-list exposure), ``$CSIM_TOKEN``.
C's documented rate limit (10 requests/s per token) is on unless ``--no-rate-limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from simulator_c.config import FaultConfig, SimConfig
from simulator_c.server import CSimulator


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulator_c", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--token", default=os.environ.get("CSIM_TOKEN"), help="default: $CSIM_TOKEN")
    p.add_argument(
        "--no-scope-token", default=os.environ.get("CSIM_NO_SCOPE_TOKEN"), help="a valid token without 'read' (403)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--participants", type=int, default=100)
    p.add_argument("--visits-per-participant", type=int, default=2)
    p.add_argument("--acquisitions-per-visit", type=int, default=3)
    p.add_argument("--files-per-acquisition", type=int, default=10)
    p.add_argument("--base-time", help="RFC 3339; base data lies in the history before it (default: now)")
    p.add_argument("--clock", choices=("real", "manual"), default="real")
    p.add_argument("--history-days", type=float, default=30.0)
    p.add_argument("--plain", action="store_true", help="no awkward text, NULs or nulls")
    p.add_argument("--invalid-fraction", type=float)
    p.add_argument("--late-parent-fraction", type=float, help="parents changed after their children")
    p.add_argument("--deleted-fraction", type=float, help="records deleted during the history")
    p.add_argument("--commit-delay", type=float, help="seconds before a change is visible")
    p.add_argument("--rate-limit", type=int, default=10, help="requests/s per token (default 10, as C)")
    p.add_argument("--no-rate-limit", action="store_true")
    p.add_argument("--config-json", help="JSON object of further SimConfig fields")
    p.add_argument("--faults-json", help="JSON object of FaultConfig fields")
    return p


def _build(args: argparse.Namespace) -> CSimulator:
    cfg: dict[str, Any] = {
        "seed": args.seed,
        "participants": args.participants,
        "visits_per_participant": args.visits_per_participant,
        "acquisitions_per_visit": args.acquisitions_per_visit,
        "files_per_acquisition": args.files_per_acquisition,
        "base_time": args.base_time,
        "clock": args.clock,
        "history_seconds": args.history_days * 86400,
    }
    for name in ("invalid_fraction", "late_parent_fraction", "deleted_fraction"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.commit_delay is not None:
        cfg["commit_delay_seconds"] = args.commit_delay
    if args.config_json:
        cfg.update(json.loads(args.config_json))
    if args.plain:
        cfg = {"awkward_fraction": 0.0, "null_fraction": 0.0, "nul_fraction": 0.0, **cfg}
    config = SimConfig.from_json(cfg)
    faults: dict[str, Any] = json.loads(args.faults_json) if args.faults_json else {}
    faults.setdefault("rate_limit", None if args.no_rate_limit else args.rate_limit)
    tokens = {args.no_scope_token: ()} if args.no_scope_token else None
    return CSimulator(config, args.token, tokens=tokens, host=args.host, port=args.port, faults=FaultConfig(**faults))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.token:
        _parser().error("give --token or set CSIM_TOKEN")
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
