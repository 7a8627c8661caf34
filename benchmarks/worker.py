"""What runs in a task's process: the task, its clock and its memory, sent back to the runner.

Kept light on purpose: the runner pickles ``run`` by name, and the heavy imports are the
fork server's (``benchmarks.preload``), done once before any task.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

PROFILE_ENV = "MEDSYNC_BENCH_PROFILE"


@dataclass
class Outcome:
    """What a task process reports: its result (or error), time and memory."""

    result: Any = None
    error: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the process (all its threads), which machine load does not inflate."""
    start_rss_mb: float = 0.0
    """RSS when the task began (what the fork inherited: Airflow and medsync imported)."""
    peak_rss_mb: float = 0.0
    """Peak RSS of the process (VmHWM), the figure the 300 MB target is about."""


def memory_mb(key: str = "VmHWM", pid: int | str = "self") -> float:
    """``VmHWM`` (peak resident set) or ``VmRSS`` of process ``pid`` (this one by default), in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def resolve(target: str) -> Any:
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run(reply: Connection, name: str, target: str, kwargs: dict[str, Any], env: dict[str, str], log_path: str) -> None:
    """Runs ``target(**kwargs)`` in this freshly forked process and sends an :class:`Outcome`.

    Output (Airflow's and medsync's logs) goes to ``log_path``, so that the console shows
    only the benchmark's table. ``env`` carries the connections, as a worker's would; with
    ``MEDSYNC_BENCH_PROFILE`` set to a folder, the task is profiled (pyinstrument) into
    ``<folder>/<name>.txt``.
    """
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(env)
    profile_dir = os.environ.get(PROFILE_ENV)
    profiler = _profiler() if profile_dir else None
    outcome = Outcome(start_rss_mb=memory_mb("VmRSS"))
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        outcome.result = resolve(target)(**kwargs)
    except BaseException:  # noqa: BLE001 (reported to the runner, which fails the benchmark)
        outcome.error = traceback.format_exc()
    outcome.seconds = time.perf_counter() - started
    outcome.cpu_seconds = time.process_time() - cpu_started
    if profiler is not None and profile_dir:
        profiler.stop()
        # Every phase runs tasks of the same names: the first profile of a name keeps it, later ones are numbered.
        path = Path(profile_dir) / f"{name}.txt"
        runs = 1
        while path.exists():
            runs += 1
            path = Path(profile_dir) / f"{name}-{runs}.txt"
        path.write_text(profiler.output_text(unicode=False, color=False), encoding="utf-8")
    outcome.peak_rss_mb = memory_mb("VmHWM")
    reply.send(outcome)
    reply.close()


def _profiler() -> Any:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    return profiler


def noop() -> None:
    """A task that does nothing: its first run times the workers' start-up."""


def check_preloaded() -> None:
    """Fails unless the fork server imported ``benchmarks.preload`` (it skips a failed import silently)."""
    import sys

    if "benchmarks.preload" not in sys.modules:
        raise RuntimeError("the fork server did not preload benchmarks.preload: is medsync on PYTHONPATH?")
