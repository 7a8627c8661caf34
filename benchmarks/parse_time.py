"""Per-file DAG parse time, next to an empty DAG's.

The dag-processor re-parses every file in dags/ many times a minute, with Airflow already
imported. So each sample is: a fresh interpreter imports ``airflow.sdk`` (not timed), then
executes one DAG file as a module (timed), as the dag-processor's import does. Each file is
sampled ``--repeat`` times in fresh subprocesses; the median is reported, with the modules
that file pulled in beyond what the empty DAG needs.

    python benchmarks/parse_time.py [--repeat 7] [--dags dags] [--json out.json]

Timings only: no thresholds here (tests/test_dag_parse_time.py checks imports, not time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EMPTY_DAG = '''"""An airflow DAG with one task and nothing else: the floor for a DAG file's parse time."""
import pendulum
from airflow.sdk import DAG, task

with DAG(dag_id="empty", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):

    @task
    def noop():
        return None

    noop()
'''

SAMPLE = r"""
import importlib.util, json, sys, time
import airflow.sdk  # the dag-processor has Airflow loaded already: not part of a file's cost
before = set(sys.modules)
path = sys.argv[1]
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("parsed_dag_file", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "modules": sorted(set(sys.modules) - before)}))
"""


def sample(path: Path, env: dict[str, str], timeout: float = 120) -> dict:
    """One parse of ``path`` in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", SAMPLE, str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(path: Path, repeat: int, env: dict[str, str]) -> dict:
    runs = [sample(path, env) for _ in range(repeat)]
    times = [r["seconds"] for r in runs]
    return {
        "file": str(path),
        "median_ms": statistics.median(times) * 1000,
        "min_ms": min(times) * 1000,
        "max_ms": max(times) * 1000,
        "modules": runs[0]["modules"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dags", type=Path, default=ROOT / "dags")
    parser.add_argument("--plugins", type=Path, default=ROOT / "plugins")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="parse-time-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            AIRFLOW_HOME=tmp,
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            # The plugins folder is on sys.path in every Airflow process: the same here.
            PYTHONPATH=os.pathsep.join(filter(None, [str(args.plugins), os.environ.get("PYTHONPATH")])),
        )
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        baseline = measure(empty, args.repeat, env)
        results = [measure(f, args.repeat, env) for f in sorted(args.dags.glob("*.py"))]

    base_modules = set(baseline["modules"])
    print(f"DAG file parse time, median of {args.repeat} fresh interpreters (airflow.sdk preloaded)")
    print(f"{'file':<40} {'median ms':>10} {'min':>8} {'max':>8} {'x empty':>8}  extra modules")
    for r in [baseline, *results]:
        name = "(empty DAG)" if r is baseline else os.path.relpath(r["file"], ROOT)
        extra = sorted({".".join(m.split(".")[:2]) for m in set(r["modules"]) - base_modules})
        ratio = r["median_ms"] / baseline["median_ms"] if baseline["median_ms"] else float("nan")
        print(
            f"{name:<40} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['max_ms']:>8.1f} {ratio:>8.1f}  "
            + (", ".join(extra[:12]) + (" ..." if len(extra) > 12 else ""))
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"empty": baseline, "files": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
