"""The local stack that the demo and the end-to-end tests run medsync in.

Everything binds to 127.0.0.1 and lives in a temporary folder or a database of its own:
an Airflow home with a SQLite metadata database (for ``airflow dags test``), the
environment that gives Airflow medsync's connections, and an S3-compatible server.
"""
