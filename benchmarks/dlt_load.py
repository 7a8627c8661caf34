"""A full load of B by dlt, run in the dlt virtualenv by ``benchmarks.peers`` (not by medsync's Python).

``python benchmarks/dlt_load.py CONFIG`` with a JSON object on stdin (base_url, api_key, dsn,
since, until, page_size, pipelines_dir) prints one JSON line: the load's seconds (extract,
normalize and load: ``pipeline.run``; importing dlt is timed apart), the process's CPU seconds
and peak RSS, and the trace's step times. It imports only the standard library, dlt and pyarrow.

CONFIG is one of:

- ``default``: dlt's ``rest_api`` source as its documentation describes B-like APIs, with only
  what B needs: the ``X-API-Key`` header, cursor paging on ``next_cursor``, the records under
  ``data``, the window and ``include_deleted=true``. Everything else is dlt's default (append,
  one resource after another, JSON-lines normalized into ``INSERT`` statements).
- ``fastest``: the fastest dlt configuration we found for B: one resource per endpoint, each
  page turned into a pyarrow table (``RESTClient.paginate`` and ``pyarrow.Table.from_pylist``,
  nested objects flattened: ADBC cannot COPY struct columns),
  the four resources extracted in parallel (``parallelized=True``), parquet files loaded
  through ADBC, and ``merge`` with the ``upsert`` strategy on the primary key ``id``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

RESOURCES = ("patients", "studies", "series", "images")


def _params(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "updated_since": job["since"],
        "updated_before": job["until"],
        "include_deleted": "true",
        "limit": job["page_size"],
    }


def _auth(job: dict[str, Any]) -> dict[str, Any]:
    return {"type": "api_key", "name": "X-API-Key", "api_key": job["api_key"], "location": "header"}


def default_source(job: dict[str, Any]) -> Any:
    from dlt.sources.rest_api import rest_api_source

    return rest_api_source(
        {
            "client": {
                "base_url": job["base_url"],
                "auth": _auth(job),
                "paginator": {"type": "cursor", "cursor_path": "next_cursor", "cursor_param": "cursor"},
            },
            "resource_defaults": {"endpoint": {"data_selector": "data", "params": _params(job)}},
            "resources": list(RESOURCES),
        },
        name="b",
    )


def fastest_source(job: dict[str, Any]) -> Any:
    import dlt
    import pyarrow as pa
    from dlt.sources.helpers.rest_client import RESTClient
    from dlt.sources.helpers.rest_client.auth import APIKeyAuth
    from dlt.sources.helpers.rest_client.paginators import JSONResponseCursorPaginator

    def pages(path: str) -> Iterator[Any]:
        client = RESTClient(
            base_url=job["base_url"],
            auth=APIKeyAuth(name="X-API-Key", api_key=job["api_key"], location="header"),
            paginator=JSONResponseCursorPaginator(cursor_path="next_cursor", cursor_param="cursor"),
            data_selector="data",
        )
        for page in client.paginate(path, params=_params(job)):
            # ADBC cannot COPY a struct column (a patient's name): flattened as dlt's own normalizer
            # flattens nested objects (``name__family``).
            table = pa.Table.from_pylist(list(page)).flatten()
            yield table.rename_columns([c.replace(".", "__") for c in table.column_names])

    @dlt.source(name="b")
    def b() -> Any:
        return [
            dlt.resource(
                pages(path),
                name=path,
                primary_key="id",
                write_disposition={"disposition": "merge", "strategy": "upsert"},
                parallelized=True,
            )
            for path in RESOURCES
        ]

    return b()


def main(argv: list[str]) -> int:
    config = argv[0]
    job = json.loads(sys.stdin.read())
    # Nothing leaves this machine: no telemetry, no version check.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    began = time.perf_counter()
    import dlt

    import_seconds = time.perf_counter() - began
    source = {"default": default_source, "fastest": fastest_source}[config](job)
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_b_{config}",
        destination=dlt.destinations.postgres(credentials=job["dsn"]),
        dataset_name="b",
        pipelines_dir=job["pipelines_dir"],
    )
    began = time.perf_counter()
    if config == "fastest":
        pipeline.run(source, loader_file_format="parquet")
    else:
        pipeline.run(source)
    seconds = time.perf_counter() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    trace = pipeline.last_trace
    steps = {step.step: (step.finished_at - step.started_at).total_seconds() for step in trace.steps}
    print(
        json.dumps(
            {
                "config": config,
                "dlt_version": dlt.__version__,
                "seconds": seconds,
                "import_seconds": import_seconds,
                "steps": steps,
                "cpu_seconds": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
                "peak_rss_mb": max(usage.ru_maxrss, children.ru_maxrss) / 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
