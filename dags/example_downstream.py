"""An example airflow DAG downstream of medsync: it runs once a sync has written all four of A's tables.

Each medsync merge emits an asset event for the A table it wrote (``medsync.dag_factory.a_table_asset``),
with the run's counts as the event's metadata; a dry run, or a level the run skips, emits none.
Copy this to schedule your own work (a search index, a cache) on A's tables.
"""

import logging
from typing import Any

from airflow.sdk import DAG, task

from medsync.dag_factory import a_table_asset

log = logging.getLogger(__name__)
A_TABLES = [a_table_asset(table) for table in ("subject", "study", "sequence", "instance")]

with DAG(
    dag_id="example_downstream",
    description="Example: runs after medsync wrote A's tables (asset-scheduled)",
    schedule=A_TABLES,
    catchup=False,
    tags=["medsync", "example"],
):

    @task
    def summarize(**context: Any) -> dict[str, Any]:
        """What the syncs that triggered this run changed, per table (counts only)."""
        changed: dict[str, Any] = {}
        for asset, events in context["triggering_asset_events"].items():
            changed[asset.name] = [dict(e.extra) for e in events]
        log.info("triggered by medsync: %s", changed)
        return changed

    summarize()
