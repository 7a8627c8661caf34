"""docker compose's b-files: puts every file B's catalogue names into the local S3 server.

B keeps image files in its bucket; the simulator serves their bytes on its admin API. This
copies each live image's file to ``s3://$MEDSYNC_B_BUCKET/<file_path without leading />``,
where medsync's file check and presigned URLs look for them. Run once after the simulator
and the S3 server are up; re-running overwrites the same keys.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import boto3
from botocore.config import Config


def _get(url: str, api_key: str) -> bytes:
    req = urllib.request.Request(url, headers={"X-API-Key": api_key})  # noqa: S310 (compose-internal http URL)
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
        return resp.read()


def _wait(url: str, api_key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(url, api_key)
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def main() -> int:
    base = os.environ["MEDSYNC_B_BASE_URL"].rstrip("/")  # http://b-simulator:8000/api/v1
    admin = base.removesuffix("/api/v1") + "/_sim"
    api_key = os.environ["BSIM_API_KEY"]
    bucket = os.environ["MEDSYNC_B_BUCKET"]
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["MEDSYNC_S3_ENDPOINT"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 (moto's fixed local credentials)
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    _wait(f"{base}/counts", api_key)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    copied, cursor = 0, None
    while True:
        query = "limit=1000" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
        page = json.loads(_get(f"{base}/images?{query}", api_key))
        for image in page["data"]:
            body = _get(f"{admin}/files/{image['id']}", api_key)
            s3.put_object(Bucket=bucket, Key=image["file_path"].lstrip("/"), Body=body)
            copied += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    print(f"b-files: {copied} files in s3://{bucket}")  # noqa: T201 (the service's one line of output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
