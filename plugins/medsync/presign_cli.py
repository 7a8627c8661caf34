"""Support tool: print presigned GET URLs for instance ids of A's tables.

Usage (from the project root, in an environment with the Airflow connections)::

    PYTHONPATH=plugins python -m medsync.presign_cli <instance-id> [<instance-id> ...] [--expires 300]

Prints one URL per line, in the order asked, on stdout. When any id is refused (not a UUID,
unknown, deleted, bucket not allowed for its source, bad key) or the expiry is over the cap,
it prints nothing on stdout, one ``error: ...`` line per problem on stderr, and exits 1, so
a script never pairs a URL with the wrong id. Exit 2 is a usage error.

Connections are Airflow's, as configured in the environment (``AIRFLOW_CONN_*`` variables,
a secrets backend or the metadata database): ``medsync_a_db`` (postgres, A's database; the
lookup runs read-only) and each source's AWS connection (``medsync_b_aws`` for B, ``storage``
in ``include/storage/a.yaml`` for A's own files). Bucket Variables (``AIRFLOW_VAR_*``) apply
as in the DAGs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import TextIO

from medsync.errors import MedsyncError

EXIT_REFUSED = 1


@contextmanager
def _logs_to_stderr() -> Iterator[TextIO]:
    """Sends everything written to stdout meanwhile to stderr; yields the real stdout.

    Airflow's logging writes to stdout (structlog, and a root handler it installs on import);
    here stdout carries only URLs, so that ``$(python -m medsync.presign_cli ID)`` works.
    """
    real = sys.stdout
    moved = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream in (real, sys.__stdout__)
    ]
    previous = [h.setStream(sys.stderr) for h in moved]
    try:
        with redirect_stdout(sys.stderr):
            yield real
    finally:
        for handler, stream in zip(moved, previous, strict=True):
            if stream is not None:
                handler.setStream(stream)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medsync.presign_cli",
        description="Print a presigned GET URL for each instance id (imaging.instance.id) of A's tables.",
    )
    parser.add_argument("instance_ids", nargs="+", metavar="instance-id", help="imaging.instance.id (UUID)")
    parser.add_argument(
        "--expires",
        type=int,
        default=None,
        metavar="SECONDS",
        help="lifetime of the URLs; default and cap from include/storage/a.yaml (300 and 3600)",
    )
    parser.add_argument(
        "--db-conn-id",
        default="medsync_a_db",
        help="Airflow connection of A's database (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    # libpq waits for ever on an unreachable host unless told otherwise.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")

    with _logs_to_stderr() as stdout:
        # Imported here so that --help answers without loading Airflow and boto3; Airflow
        # installs its log handlers on import, hence inside the redirection.
        import psycopg
        from airflow.sdk.exceptions import AirflowNotFoundException

        from medsync.hooks.a_database import ADatabaseHook
        from medsync.hooks.storage import presign_instances

        try:
            conn = ADatabaseHook(args.db_conn_id).get_conn()
            try:
                conn.read_only = True  # a support tool never writes A's tables
                conn.execute("SET statement_timeout = 10000")
                batch = presign_instances(conn, args.instance_ids, expires_in=args.expires)
            finally:
                conn.close()
        except (MedsyncError, AirflowNotFoundException, psycopg.Error) as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_REFUSED

    if batch.refused:
        for reason in batch.refused.values():
            sys.stderr.write(f"error: {reason}\n")
        return EXIT_REFUSED
    for url in batch.urls.values():
        stdout.write(f"{url}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
