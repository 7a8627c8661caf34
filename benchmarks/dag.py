"""Running a source DAG's tasks as Airflow's workers would: one process per task, in the DAG's order.

``Workers`` is a fork server that imported Airflow and medsync once (``benchmarks.preload``);
each task is a fresh process forked from it, so every task's time and peak RSS are its own
and Airflow's start-up is paid once and reported apart. ``run_sync`` mirrors
``medsync.dag_factory``: prepare, then the pulls (all levels at once, the instance pull split
into time slices), the merges parents first (each after its pulls and the previous merge),
check_files, report, finish. With ``one_by_one`` the same graph runs one task at a time, in
the order ``airflow dags test`` runs it (``one_after_another``).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from benchmarks.worker import Outcome, run
from medsync.config import LEVELS
from medsync.windows import RunFacts


class BenchError(RuntimeError):
    """The benchmark cannot go on (a task failed, a check did not hold)."""


@dataclass(frozen=True)
class Task:
    name: str
    target: str
    """``module:function`` run in the task's process."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()


@dataclass
class TaskRun:
    name: str
    seconds: float
    """Wall time seen by the runner, fork included."""
    body_seconds: float
    """Time inside the task function."""
    cpu_seconds: float
    """CPU time of the task's process."""
    began: float
    """Seconds after the graph started."""
    start_rss_mb: float
    peak_rss_mb: float
    result: Any


@dataclass
class SyncRun:
    """One DAG run: its wall time (Airflow start-up excluded) and each task's figures."""

    run_id: int
    kind: str
    seconds: float
    tasks: dict[str, TaskRun]

    def tasks_like(self, prefix: str) -> list[TaskRun]:
        return [t for name, t in self.tasks.items() if name.startswith(prefix)]


class Workers:
    """Task processes forked from a server that preloaded Airflow and medsync."""

    def __init__(self, log_path: str, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})
        """The environment of every task: connections, Variables, the include folder."""
        self.log_path = log_path
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["benchmarks.preload"])

    def using(self, env: dict[str, str]) -> Workers:
        """The same workers with another environment (another database or simulator)."""
        return Workers(self.log_path, env)

    def start(self) -> float:
        """Starts the fork server (imports Airflow and medsync) and returns how long that took."""
        began = time.perf_counter()
        self.run_graph([Task("start-up", "benchmarks.worker:check_preloaded")])
        return time.perf_counter() - began

    def run_one(self, target: str, **kwargs: Any) -> TaskRun:
        return self.run_graph([Task("task", target, kwargs)])["task"]

    def run_graph(self, tasks: Iterable[Task]) -> dict[str, TaskRun]:
        """Runs every task as soon as the tasks it comes after are done; raises on the first failure."""
        waiting = {t.name: t for t in tasks}
        running: dict[Connection, tuple[Task, multiprocessing.process.BaseProcess, float]] = {}
        done: dict[str, TaskRun] = {}
        origin = time.perf_counter()
        try:
            while waiting or running:
                for task in [t for t in waiting.values() if all(a in done for a in t.after)]:
                    del waiting[task.name]
                    ours, theirs = self._ctx.Pipe(duplex=False)
                    proc: multiprocessing.process.BaseProcess = self._ctx.Process(
                        target=run,
                        args=(theirs, task.name, task.target, task.kwargs, self.env, self.log_path),
                        name=f"bench-{task.name}",
                    )
                    began = time.perf_counter()
                    proc.start()
                    theirs.close()
                    running[ours] = (task, proc, began)
                if not running:
                    raise BenchError(f"tasks wait for tasks that are not in the graph: {sorted(waiting)}")
                for ready in wait(list(running)):
                    assert isinstance(ready, Connection)
                    task, proc, began = running.pop(ready)
                    try:
                        outcome: Outcome | None = ready.recv()
                    except EOFError:
                        outcome = None
                    proc.join()
                    ended = time.perf_counter()
                    if outcome is None or outcome.error is not None:
                        detail = outcome.error if outcome else f"the process died (exit code {proc.exitcode})"
                        raise BenchError(f"task {task.name} failed (log: {self.log_path}):\n{detail}")
                    done[task.name] = TaskRun(
                        name=task.name,
                        seconds=ended - began,
                        body_seconds=outcome.seconds,
                        cpu_seconds=outcome.cpu_seconds,
                        began=began - origin,
                        start_rss_mb=outcome.start_rss_mb,
                        peak_rss_mb=outcome.peak_rss_mb,
                        result=outcome.result,
                    )
        finally:
            for _, proc, _ in running.values():  # only after a failure: stop the siblings
                proc.terminate()
                proc.join()
        return done


def sync_graph(
    run_id: int, instance_slices: int, levels: Iterable[str] = LEVELS, *, source: str = "b", pulls_only: bool = False
) -> list[Task]:
    """``source``'s DAG's tasks after prepare, with the DAG's dependencies (``medsync.dag_factory``)."""
    tasks: list[Task] = []
    previous_merge: tuple[str, ...] = ()
    for level in levels:
        slices = instance_slices if level == "instance" else 1
        pulls = tuple(f"pull_{level}" + (f"_{i}" if slices > 1 else "") for i in range(slices))
        for i, name in enumerate(pulls):
            kwargs = {"source": source, "level": level, "run_id": run_id, "slice_index": i, "slices": slices}
            tasks.append(Task(name, "medsync.tasks:pull", kwargs))
        if pulls_only:
            continue
        merge = f"merge_{level}"
        tasks.append(
            Task(
                merge,
                "medsync.tasks:merge",
                {"source": source, "level": level, "run_id": run_id},
                after=(*pulls, *previous_merge),
            )
        )
        previous_merge = (merge,)
    if not pulls_only:
        ids = {"source": source, "run_id": run_id}
        tasks.append(Task("check_files", "medsync.tasks:check_files", ids, after=previous_merge))
        tasks.append(Task("report", "medsync.tasks:report", ids, after=("check_files",)))
        tasks.append(Task("finish", "medsync.tasks:finish", ids, after=("report",)))
    return tasks


def one_after_another(tasks: Sequence[Task]) -> list[Task]:
    """``tasks`` chained, each after the one before, in the order ``airflow dags test`` runs a DAG.

    ``DAG.test`` loops: it schedules every task whose upstream tasks are done, runs those one at
    a time, and looks again. So the order is the graph's waves, each wave's tasks in turn (here
    in the graph's own order; ``DAG.test`` takes a wave in no set order, which changes nothing
    when every task runs alone).
    """
    done: set[str] = set()
    order: list[Task] = []
    while len(order) < len(tasks):
        wave = [t for t in tasks if t.name not in done and all(a in done for a in t.after)]
        if not wave:
            raise BenchError(
                f"tasks wait for tasks that are not in the graph: {[t.name for t in tasks if t.name not in done]}"
            )
        order += wave
        done.update(t.name for t in wave)
    return [replace(task, after=(order[i - 1].name,) if i else ()) for i, task in enumerate(order)]


def prepare(workers: Workers, source: str, dag_run_id: str, facts: RunFacts) -> TaskRun:
    return workers.run_one("medsync.tasks:prepare", source=source, dag_run_id=dag_run_id, facts=facts)


def run_sync(
    workers: Workers, source: str, dag_run_id: str, facts: RunFacts, instance_slices: int, *, one_by_one: bool = False
) -> SyncRun:
    """One whole DAG run; its time runs from prepare's fork to finish's end.

    ``one_by_one``: every task after the previous one (``one_after_another``) instead of as
    soon as its upstream tasks are done.
    """
    began = time.perf_counter()
    prepared = prepare(workers, source, dag_run_id, facts)
    plan = prepared.result
    graph = sync_graph(plan["run_id"], instance_slices, source=source)
    tasks = workers.run_graph(one_after_another(graph) if one_by_one else graph)
    seconds = time.perf_counter() - began
    for task in tasks.values():
        task.began += prepared.seconds
    return SyncRun(plan["run_id"], plan["kind"], seconds, {"prepare": prepared, **tasks})
