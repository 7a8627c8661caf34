"""The benchmark's figures as the plain-text table ``python -m benchmarks`` prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join([f"{first:<{widths[0]}}", *(f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True))])

    return [line(header), *(line(r) for r in rows)]


PULL_SHARE_OF_FLOOR = 2 / 3
"""A pull task's records/s must be at least this share of the floor's on the same level."""

PEER_LABELS = {"default": "rest_api, defaults", "fastest": "fastest (arrow, parquet/ADBC, upsert)"}


def _peer_lines(r: dict[str, Any]) -> list[str]:
    """dlt beside medsync and the floor: x the floor, rows checked against B's /counts, CPU."""
    peers = r.get("peers", {})
    if "skipped" in peers:
        return [f"dlt: not run ({peers['skipped']})"]
    # Medians of the pairs: the floor ran once per pair, dlt once, all on the same catalogue.
    pairs = r.get("pairs") or [{"floor_seconds": r["floor"]["seconds"], "full_load_seconds": r["full_load"]["seconds"]}]
    floor_s = statistics.median(p["floor_seconds"] for p in pairs)
    full_s = statistics.median(p["full_load_seconds"] for p in pairs)
    parts = [
        f"floor 1.00 ({floor_s:.1f} s)",
        f"medsync full load {r.get('pairs_median_ratio', full_s / floor_s):.2f} ({full_s:.1f} s)",
    ]
    if "sequential" in r:
        one_by_one = r["sequential"]["seconds"]
        parts.append(f"medsync tasks one after another {one_by_one / floor_s:.2f} ({one_by_one:.1f} s)")
    checks = []
    for config, f in peers.items():
        if "seconds" not in f:
            checks.append(f"dlt {config} FAILED: {f.get('failed', '?')[-200:]}")
            continue
        parts.append(f"dlt {config} {f['seconds'] / floor_s:.2f} ({f['seconds']:.1f} s)")
        rows = f["rows"]
        verdict = "match" if rows["matches"] else f"DIFFER: {rows['not_deleted']} vs {rows['source_live']}"
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in f.get("steps", {}).items() if k != "run")
        checks.append(
            f"dlt {config}: rows not deleted vs B's /counts {verdict}; {steps}; process {f['cpu_seconds']:.1f} CPU s,"
            f" simulator {f['cpu']['simulator_cpu_seconds']:.1f} CPU s, machine busy"
            f" {f['cpu']['machine_busy_cores']:.1f} cores; importing dlt {f['import_seconds']:.1f} s (not timed)"
        )
    return [f"side by side, x the floor (medians of {len(pairs)} pairs): " + ", ".join(parts), *checks]


RUN_HEADER = ["run", "seconds", "records", "records/s", "x floor", "x full load", "A rows written", "peak RSS MB"]


@dataclass(frozen=True)
class Run:
    """One row of a run table: a run's figures beside its catalogue's floor and full load."""

    name: str
    figures: dict[str, Any]
    floor_seconds: float | None
    """The floor of the same catalogue (None: none was measured); the main catalogues' is the median of the pairs'."""
    written: bool = True
    """Whether the run wrote into A (its rows written are counted)."""


def _run_grid(runs: Sequence[Run], full_seconds: float) -> list[str]:
    rows = []
    for run in runs:
        f = run.figures
        w = f.get("written", {}).get("total_tuples") if run.written else None
        rows.append(
            [
                run.name,
                _n(f["seconds"], 1),
                _n(f["records"]),
                _n(f["records_per_s"]),
                "-" if run.floor_seconds is None else f"{f['seconds'] / run.floor_seconds:.2f}",
                f"{f['seconds'] / full_seconds:.3f}",
                "-" if w is None else _n(w),
                _n(f.get("peak_rss_mb")),
            ]
        )
    return _grid(RUN_HEADER, rows)


def _level_grid(title: str, full: dict[str, Any]) -> list[str]:
    """One full load's figures per level: its pulls and its merges."""
    rows = [
        [
            level,
            _n(f["records"]),
            _n(f["pull_seconds"], 2),
            _n(f["pull_records_per_s"]),
            _n(f["merge_seconds"], 2),
            _n(f["merge_records_per_s"]),
            _n(f["merge_build_seconds"], 2),
            _n(f["merge_write_seconds"], 2),
            _n(f["pull_peak_rss_mb"]),
            _n(f["merge_peak_rss_mb"]),
        ]
        for level, f in full["levels"].items()
    ]
    header = [title, "records", "pull s", "pull rec/s", "merge s", "merge rec/s", "work table s"]
    return _grid([*header, "writing A session-s", "pull RSS MB", "merge RSS MB"], rows)


def _pull_vs_floor_grid(loads: dict[str, Any], slices: int, label: str = "") -> list[str]:
    """Each level's pull beside the floor on the same level, medians of the pairs (the target is 2/3)."""
    title = f"{label}pull vs floor, medians of {len(loads['pairs'])} pairs"
    if slices > 1:
        title += f" (instance: {slices} slices, first start to last end)"
    rows = [
        [
            level,
            _n(f["pull_records_per_s"]),
            _n(f["floor_records_per_s"]),
            f"{f['ratio']:.2f}",
            "met" if f["ratio"] >= PULL_SHARE_OF_FLOOR else "MISSED",
        ]
        for level, f in loads["pull_vs_floor"].items()
    ]
    return _grid([title, "pull rec/s", "floor rec/s", "pull / floor", f">= {PULL_SHARE_OF_FLOOR:.2f}"], rows)


def _least_line(least: dict[str, Any]) -> str:
    """The least full load here (``benchmarks.run.full_load_bound``), said in a line."""
    return (
        f"least full load here: {least['min_seconds']:.1f} s = {least['min_ratio']:.2f}x the floor,"
        f" the larger of the instance level's floor ({least['instance_floor_seconds']:.1f} s) and the full load's"
        f" CPU work ({least['cpu_work_core_seconds']:.0f} core-s) over {least['cores']} cores;"
        f" a 1.5x full load could do {least['work_at_1_5x_core_seconds']:.0f} core-s of work"
    )


def _pairs_line(loads: dict[str, Any], label: str = "") -> list[str]:
    pairs = loads["pairs"]
    if len(pairs) < 2:
        return []
    each = ", ".join(f"{p['full_load_seconds']:.1f} / {p['floor_seconds']:.1f} s = {p['ratio']:.2f}" for p in pairs)
    median = loads["pairs_median_ratio"]
    return [f"{label}full load / floor, {len(pairs)} pairs each into a fresh A: {each} (median {median:.2f})"]


def _median_floor(loads: dict[str, Any]) -> float:
    return float(statistics.median(p["floor_seconds"] for p in loads["pairs"]))


def _c_lines(r: dict[str, Any]) -> list[str]:
    """C's full load measured as B's: its own block, every ratio against C's own floor and full load."""
    c = r["c"]
    if "skipped" in c:
        return [f"C: not run ({c['skipped']})"]
    cat, floor_s = c["catalogue"], _median_floor(c)
    runs = [
        Run("C floor: fetch + raw COPY", c["floor"], floor_s, written=False),
        Run("C full load, pulls in parallel", c["full_load"], floor_s),
    ]
    if "sequential" in c:
        runs.append(Run("C full load, tasks one after another", c["sequential"], floor_s))
    out = [
        f"C: {cat['instances']:,} instances ({cat['records']:,} records in 4 levels), page size {c['page_size']},"
        f" instance slices {c['slices']}; C simulator without its rate limit (peak RSS"
        f" {cat['simulator_peak_rss_mb']:.0f} MB)",
        *_run_grid(runs, c["full_load"]["seconds"]),
        "",
        *_level_grid("C full load, per level", c["full_load"]),
        "",
        *_pull_vs_floor_grid(c, c["slices"], "C "),
        *_pairs_line(c, "C: "),
    ]
    return out


def render(r: dict[str, Any]) -> str:
    full = r["full_load"]
    cat = r["catalogue"]
    opts = r["options"]
    out = [
        f"medsync benchmark {r['started_at']}: {cat['instances']:,} instances ({cat['records']:,} records in 4 levels),"
        f" page size {opts['page_size']}, instance slices {opts['slices']}",
        f"machine: {r['machine']['cpus']} CPUs, PostgreSQL {r['machine']['postgresql']}, load average "
        f"{r['load_before'][0]} before / {r['load_after'][0]} after; B simulator without its rate limit (peak RSS"
        f" {cat['simulator_peak_rss_mb']:.0f} MB)",
        f"worker start-up (Airflow and medsync imported once per worker; excluded from every time below): "
        f"{r['startup_seconds']:.1f} s",
        "",
    ]

    naive = r["naive"]
    naive_n = f"{naive['catalogue']['instances']:,} instances"
    naive_floor = naive["floor"]["seconds"]
    floor_s = _median_floor(r)
    peers = r.get("peers", {})
    dlt_runs = [
        Run(f"dlt {f.get('dlt_version', '')} {PEER_LABELS[config]}", f, floor_s, written=False)
        for config, f in peers.items()
        if isinstance(f, dict) and "seconds" in f
    ]
    sequential = [Run("full load, tasks one after another", r["sequential"], floor_s)] if "sequential" in r else []
    runs = [
        Run("floor: fetch + raw COPY", r["floor"], floor_s, written=False),
        Run("full load, pulls in parallel", full, floor_s),
        *sequential,
        *dlt_runs,
        Run("no change: newest 12 h window", r["no_change_window"], floor_s),
        Run("no change: full refresh", r["no_change_full_refresh"], floor_s),
        Run(f"incremental {opts['incremental_fraction']:.0%} in one 12 h window", r["incremental"], floor_s),
        Run(f"naive baseline, {naive_n}", naive["naive"], naive_floor, written=False),
        Run(f"sync, same {naive_n}", naive["sync"], naive_floor, written=False),
        Run(f"floor, same {naive_n}", naive["floor"], naive_floor, written=False),
        *(Run(f"full load, {s['catalogue']['instances']:,} instances", s, None) for s in r["scale"]),
    ]
    out += _run_grid(runs, full["seconds"])
    out += ["", *_level_grid("full load, per level", full)]
    out += ["", *_pull_vs_floor_grid(r, opts["slices"])]

    out.append("")
    sliced = "; ".join(
        f"{s['slices']}: {s['seconds']:.1f} s (floor {s['floor_seconds']:.1f} s; machine busy "
        f"{s['cpu']['machine_busy_cores']:.1f} cores, pulls {s['pull_cpu_seconds']:.1f} CPU s, "
        f"simulator {s['cpu']['simulator_cpu_seconds']:.1f} CPU s)"
        for s in r["slices"]
    )
    out.append(f"instance pull of the whole window in parallel time slices: {sliced}")
    fl, tasks_cpu = r["floor"], sum(t["cpu_seconds"] for t in full["tasks"].values())
    out.append(
        f"CPU: floor {fl['cpu']['machine_busy_cores']:.1f} cores busy (simulator "
        f"{fl['cpu']['simulator_cpu_seconds']:.1f} s, fetch+COPY {fl['client_cpu_seconds']:.1f} s); full load "
        f"{full['cpu']['machine_busy_cores']:.1f} cores busy (simulator {full['cpu']['simulator_cpu_seconds']:.1f} s, "
        f"task processes {tasks_cpu:.1f} s; PostgreSQL's share is the rest)"
    )
    work = full["cpu"].get("machine_cpu_seconds")
    if work:
        cores = r["machine"]["cpus"]
        out.append(
            f"CPU work of the full load: {work:.0f} core-s, so at least {work / cores:.1f} s on {cores} cores"
            f" even if no core ever waited: {work / cores / fl['seconds']:.2f}x the floor"
        )
    out += _pairs_line(r)
    limit = full["b_rate_limit"]
    out.append(
        f"B's real limit ({limit['requests_per_s']} requests/s per key, all tasks together): this load is "
        f"{limit['pages']:,} pages, so at least {limit['min_seconds']:.0f} s "
        f"({limit['min_seconds_at_1000_per_page']:.0f} s at 1,000 records per page)"
    )
    out += _peer_lines(r)
    inc = r["incremental"]
    out.append(
        f"incremental: prepare to last merge {inc['seconds_to_last_merge']:.1f} s "
        f"({inc['seconds_to_last_merge'] / full['seconds']:.3f} x full load), report {inc['report_seconds']:.1f} s"
    )
    changed = r["incremental"].get("changed", {})
    if changed:
        kinds = ", ".join(f"{kind} {sum(v.values()):,}" for kind, v in changed.items())
        out.append(f"incremental changes made in B: {kinds} (cascades counted at their own level)")

    b = r["bounds"]
    least, most = b["full_load"], b["naive"]
    out.append(_least_line(least))
    out.append(
        f"naive baseline (not a target since issue 14): the sync was {naive['speed_up']:.1f}x faster; no sync can be"
        f" more than naive {most['naive_seconds']:.1f} s / floor of the same catalogue {most['floor_seconds']:.1f} s"
        f" = {most['max_speed_up']:.1f}x faster here"
    )

    out += ["", *_c_lines(r)]

    out.append("")
    out.append("targets")
    for t in r["targets"]:
        value = t["value"]
        shown = _n(value) if isinstance(value, int) else f"{value:.3f}"
        bound = f"; this machine's bound {t['bound']:.2f}" if t.get("bound") is not None else ""
        out.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {shown} (limit {t['limit']}{bound})")
    return "\n".join(out)
