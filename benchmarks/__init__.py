"""medsync's benchmarks.

``python -m benchmarks`` (``make bench``) runs the sync's real task code (the functions the
DAG's tasks call, each task in a process of its own) against the B simulator over HTTP and a
real PostgreSQL, prints the figures as a table and saves them to ``benchmarks/results/``.
What each figure means: ``docs/benchmarks.md``. ``parse_time.py`` beside it times DAG parsing.
"""
