"""An S3-compatible server on 127.0.0.1 (moto's server mode) holding a source's files."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

# moto logs every request through werkzeug; the stack is quiet unless something fails.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@contextmanager
def s3_server() -> Iterator[str]:
    """Yields the endpoint URL of a fresh moto S3 server; stops it afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(signature_version="s3v4", connect_timeout=5, read_timeout=30),
    )


def _ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def put_files(endpoint: str, bucket: str, files: Iterable[tuple[str, bytes]]) -> int:
    """Creates ``bucket`` if needed and puts every (key, bytes); returns how many."""
    client = _client(endpoint)
    _ensure_bucket(client, bucket)
    count = 0
    for key, body in files:
        client.put_object(Bucket=bucket, Key=key, Body=body)
        count += 1
    return count


# S3's bucket naming rules (lower-case letters, digits, '.', '-'; 3-63 characters).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def put_objects(endpoint: str, objects: Iterable[tuple[tuple[str, str], bytes]]) -> dict[str, int]:
    """Puts every ((bucket, key), bytes), creating each bucket on first use; returns how many
    objects per bucket. For sources that spread files over several buckets, such as C
    (``simulator_c``'s ``iter_files()`` yields exactly this shape).

    A record may name a bucket no S3 can have (C's defect ``bucket_not_allowed`` can be
    ``"c-archive-eu-1 "``): such objects cannot exist, and are left out."""
    client = _client(endpoint)
    counts: dict[str, int] = {}
    for (bucket, key), body in objects:
        if not _BUCKET_NAME.fullmatch(bucket):
            continue
        if bucket not in counts:
            _ensure_bucket(client, bucket)
            counts[bucket] = 0
        client.put_object(Bucket=bucket, Key=key, Body=body)
        counts[bucket] += 1
    return counts
