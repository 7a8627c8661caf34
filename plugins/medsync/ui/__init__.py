"""The medsync page in the Airflow UI: what every source's runs did, what is held back and why.

``plugin`` (the AirflowPlugin: a FastAPI app and the UI's navigation entry), ``app`` (the
FastAPI app and its routes), ``auth`` (Airflow's token and auth manager), ``database``
(read-only sessions of A's database), ``queries`` (the SQL the page reads), ``masked_keys``
(how keys that identify patients are shown), ``static/`` (the page itself). The plugin class
lives in ``plugin`` only: Airflow imports every file of the plugins folder and registers every
AirflowPlugin subclass it finds in one.
"""
