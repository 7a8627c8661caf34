"""medsync's Airflow DAGs: one DAG per source config in include/sources/ (dag_id medsync_<source>).

Thin on purpose: the DAG is built by medsync.dag_factory (plugins/medsync/), which reads
local YAML only. Nothing here touches the network, a database or Airflow Variables.
"""

from medsync.dag_factory import build_dags

for _dag in build_dags():
    globals()[_dag.dag_id] = _dag
