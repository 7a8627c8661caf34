"""docker compose's c-files: puts every object C's catalogue holds into the local S3 server.

C spreads its files over several buckets (c-archive-eu-1, c-archive-eu-2); the simulator lists
them on its admin API with their bytes. This creates each bucket and copies each object to
``s3://<bucket>/<key>``, where medsync's file check and presigned URLs look for them. Run once
after the simulator and the S3 server are up; re-running overwrites the same keys.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
import requests
from botocore.config import Config

from simulator_c.client import CSimAdminClient


def main() -> int:
    base = os.environ["MEDSYNC_C_BASE_URL"].rstrip("/")  # http://c-simulator:8001/v2
    admin = CSimAdminClient(base, os.environ["CSIM_TOKEN"])
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["MEDSYNC_S3_ENDPOINT"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 (moto's fixed local credentials)
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            objects = list(admin.iter_files())
            break
        except (requests.ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    buckets: set[str] = set()
    for (bucket, key), body in objects:
        if bucket not in buckets:
            try:
                s3.create_bucket(Bucket=bucket)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
            buckets.add(bucket)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    print(f"c-files: {len(objects)} files in {', '.join(f's3://{b}' for b in sorted(buckets))}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
