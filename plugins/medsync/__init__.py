"""medsync: keeps service A's imaging catalogue in sync with other services' catalogues.

The package lives in Airflow's plugins folder, which every Airflow process (scheduler,
dag-processor, workers) puts on ``sys.path``. Modules are split by responsibility:

- ``config``: source configs (``include/sources/*.yaml``) and paths;
- ``errors``: the ``MedsyncError`` family;
- ``mapping``: source vocabulary -> A vocabulary (``include/mappings/*.yaml``);
- ``sources``: one client and record model per source protocol;
- ``schema``: medsync's own PostgreSQL schema, its migrations, checks of A's tables;
- ``windows``: which ``[since, until)`` window a run syncs;
- ``staging``: pulling a level into a staging table with COPY;
- ``merge``: set-based merge of staging into A's tables;
- ``report``: per-run figures and reconciliation with the source's counts;
- ``hooks``: Airflow hooks (database, source API, storage);
- ``dag_factory``: builds one DAG per source config, importing nothing heavy.
"""
