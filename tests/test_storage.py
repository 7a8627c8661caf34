"""Presigned URLs, the reachability check and the support CLI, against a real S3 server over HTTP.

The S3 server is moto's ThreadedMotoServer on 127.0.0.1 (random port). moto serves presigned
GETs but checks neither their signature nor their expiry, so every URL is also verified here
with an independent SigV4 implementation (``verify_presigned_get``: canonical request, string
to sign and signing key written from AWS's documentation), itself checked against AWS's
published example and against tampered URLs.

"Denied" is real: the reachability test switches on moto's IAM enforcement
(``/moto-api/reset-auth``) with B's identity being an IAM user granted only B's bucket, so a
HEAD in another allowed bucket gets a 403 from the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import boto3
import psycopg
import pytest
import requests
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from medsync.config import get_source_config
from medsync.errors import StorageError
from medsync.files import check_instance_files
from medsync.hooks.storage import (
    InstanceFileHook,
    PresignPolicy,
    SourceHooks,
    key_problem,
    presign_instance,
    presign_instances,
    presign_sequence,
)

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
B_KEYS = ("AKIDMEDSYNCB0000TEST", "b-secret/Key+with=odd chars 0123456789")
A_KEYS = ("AKIDMEDSYNCA0000TEST", "a-secret-key-0123456789abcdefABCDEF")
B_BUCKET = "b-imaging-dev"  # include/sources/b.yaml
A_BUCKET = "a-imaging-dev"  # include/storage/a.yaml
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
VARIABLES = ("MEDSYNC_B_BUCKET", "MEDSYNC_B_ALLOWED_BUCKETS", "MEDSYNC_A_BUCKET", "MEDSYNC_A_ALLOWED_BUCKETS")


# --- an independent SigV4 verifier (AWS docs: "Authenticating Requests: Using Query Parameters") ---


class BadUrl(AssertionError):
    """A presigned URL that S3 would reject (or that is not the one asked for)."""


def _uri_encode(text: str, *, keep_slash: bool) -> str:
    # RFC 3986 unreserved characters stay; everything else is %XX of its UTF-8 bytes.
    return quote(text, safe="-_.~" + ("/" if keep_slash else ""))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sigv4_query_signature(
    *, method: str, host: str, path: str, params: dict[str, str], secret_key: str, region: str, service: str
) -> str:
    """The X-Amz-Signature of a presigned request whose only signed header is host."""
    canonical_query = "&".join(
        f"{_uri_encode(k, keep_slash=False)}={_uri_encode(v, keep_slash=False)}"
        for k, v in sorted(params.items())
        if k != "X-Amz-Signature"
    )
    canonical_request = "\n".join([method, path, canonical_query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
    amz_date = params["X-Amz-Date"]
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()]
    )
    key = _hmac(f"AWS4{secret_key}".encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_presigned_get(
    url: str,
    *,
    access_key: str,
    secret_key: str,
    host: str,
    path: str,
    expires: int,
    region: str = REGION,
    now: datetime | None = None,
) -> None:
    """Raises BadUrl unless ``url`` is a valid, unexpired SigV4 GET for exactly host + path."""
    now = now or datetime.now(UTC)
    parts = urlsplit(url)
    if parts.netloc != host:
        raise BadUrl(f"signed for host {parts.netloc}, expected {host}")
    if parts.path != path:
        raise BadUrl(f"path {parts.path} is not {path} (bucket/key)")
    params: dict[str, str] = {}
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if name in params:
            raise BadUrl(f"parameter {name} repeated")
        params[unquote(name)] = unquote(value)  # not unquote_plus: '+' is literal in SigV4
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise BadUrl(f"not SigV4: {sorted(params)}")
    if params.get("X-Amz-SignedHeaders") != "host":
        raise BadUrl("signed headers are not just host")
    amz_date = params.get("X-Amz-Date", "")
    if params.get("X-Amz-Credential") != f"{access_key}/{amz_date[:8]}/{region}/s3/aws4_request":
        raise BadUrl(f"credential scope {params.get('X-Amz-Credential')} is not the expected identity/region")
    if params.get("X-Amz-Expires") != str(expires):
        raise BadUrl(f"X-Amz-Expires {params.get('X-Amz-Expires')} is not {expires}")
    signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if not signed_at - timedelta(minutes=1) <= now < signed_at + timedelta(seconds=expires):
        raise BadUrl("expired or signed in the future")
    expected = sigv4_query_signature(
        method="GET", host=host, path=path, params=params, secret_key=secret_key, region=region, service="s3"
    )
    if not hmac.compare_digest(expected, params.get("X-Amz-Signature", "")):
        raise BadUrl("signature does not match")


def s3_path(bucket: str, key: str) -> str:
    return f"/{bucket}/{_uri_encode(key, keep_slash=True)}"


AWS_EXAMPLE_URL = (
    "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
)
AWS_EXAMPLE = {
    "access_key": "AKIAIOSFODNN7EXAMPLE",
    "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "host": "examplebucket.s3.amazonaws.com",
    "path": "/test.txt",
    "expires": 86400,
    "now": datetime(2013, 5, 24, 0, 0, 10, tzinfo=UTC),
}


def test_verifier_reproduces_aws_example_and_rejects_tampering() -> None:
    verify_presigned_get(AWS_EXAMPLE_URL, **AWS_EXAMPLE)  # AWS's published vector passes
    tampered = [
        AWS_EXAMPLE_URL.replace("/test.txt", "/test.txx"),  # another key
        AWS_EXAMPLE_URL.replace("X-Amz-Expires=86400", "X-Amz-Expires=86401"),
        AWS_EXAMPLE_URL.replace("Signature=aeeed9", "Signature=aeeed8"),
        AWS_EXAMPLE_URL.replace("X-Amz-Date=20130524T000000Z", "X-Amz-Date=20130524T000001Z"),
        AWS_EXAMPLE_URL + "&response-content-type=text%2Fhtml",  # an unsigned extra parameter
    ]
    for url in tampered:
        with pytest.raises(BadUrl):
            verify_presigned_get(url, **{**AWS_EXAMPLE, "expires": int(re.search(r"Expires=(\d+)", url)[1])})
    with pytest.raises(BadUrl, match="signature"):
        verify_presigned_get(AWS_EXAMPLE_URL, **{**AWS_EXAMPLE, "secret_key": "wrong"})
    with pytest.raises(BadUrl, match="expired"):
        verify_presigned_get(AWS_EXAMPLE_URL, **{**AWS_EXAMPLE, "now": datetime(2013, 5, 25, 0, 0, 1, tzinfo=UTC)})


# --- fixtures: S3 server, connections, A's rows ------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _aws_conn(endpoint: str, keys: tuple[str, str], **extra: object) -> str:
    return json.dumps(
        {
            "conn_type": "aws",
            "login": keys[0],
            "password": keys[1],
            "extra": {"endpoint_url": endpoint, "region_name": REGION, **extra},
        }
    )


@dataclass
class Env:
    endpoint: str
    host: str
    admin: object  # boto3 S3 client with full rights (setup only)
    monkeypatch: pytest.MonkeyPatch

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.admin.put_object(Bucket=bucket, Key=key, Body=body)

    def set_variable(self, name: str, value: str | None) -> None:
        if value is None:
            self.monkeypatch.delenv(f"AIRFLOW_VAR_{name.upper()}", raising=False)
        else:
            self.monkeypatch.setenv(f"AIRFLOW_VAR_{name.upper()}", value)


@pytest.fixture
def env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A reset S3 server with A's and B's buckets, and connections for both identities."""
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in VARIABLES:
        monkeypatch.delenv(f"AIRFLOW_VAR_{name}", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_B_AWS", _aws_conn(moto_endpoint, B_KEYS))
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_AWS", _aws_conn(moto_endpoint, A_KEYS))
    admin = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name=REGION,
        aws_access_key_id="admin",
        aws_secret_access_key="x",
    )
    for bucket in (B_BUCKET, A_BUCKET, "b-imaging-staging", "b-imaging-old", "someone-elses-bucket"):
        admin.create_bucket(Bucket=bucket)
    return Env(moto_endpoint, urlsplit(moto_endpoint).netloc, admin, monkeypatch)


class Rows:
    """Inserts A's rows: subject -> study -> sequence -> instance, per source."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._sequences: dict[str, uuid.UUID] = {}

    def _key(self, source: str) -> str | None:
        return None if source == "a" else uuid.uuid4().hex

    def sequence(self, source: str = "b", *, deleted: bool = False) -> uuid.UUID:
        subject, study, sequence = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        self.conn.execute(
            "INSERT INTO imaging.subject (id, source_system, source_key, patient_code) VALUES (%s, %s, %s, %s)",
            (subject, source, self._key(source), "MRN-1"),
        )
        self.conn.execute(
            "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status)"
            " VALUES (%s, %s, %s, %s, %s, 'COMPLETED')",
            (study, subject, source, self._key(source), f"1.2.{study.int}"),
        )
        self.conn.execute(
            "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
            " deleted_at) VALUES (%s, %s, %s, %s, %s, 'CT', %s)",
            (
                sequence,
                study,
                source,
                self._key(source),
                f"1.3.{sequence.int}",
                datetime.now(UTC) if deleted else None,
            ),
        )
        return sequence

    def instance(
        self,
        bucket: str,
        key: str,
        *,
        source: str = "b",
        sequence: uuid.UUID | None = None,
        deleted: bool = False,
        number: int | None = None,
        updated_at: datetime | None = None,
    ) -> uuid.UUID:
        if sequence is None:
            sequence = self._sequences.get(source) or self._sequences.setdefault(source, self.sequence(source))
        id_ = uuid.uuid4()
        self.conn.execute(
            "INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid,"
            " instance_number, storage_bucket, storage_key, deleted_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s, now()))",
            (
                id_,
                sequence,
                source,
                self._key(source),
                f"1.4.{id_.int}",
                number,
                bucket,
                key,
                datetime.now(UTC) if deleted else None,
                updated_at,
            ),
        )
        return id_


@pytest.fixture
def db(a_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(a_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def rows(db: psycopg.Connection) -> Rows:
    return Rows(db)


def counting_connection(dsn: str) -> tuple[psycopg.Connection, list[str]]:
    """A connection that records every statement run through its cursors."""
    statements: list[str] = []

    class CountingCursor(psycopg.Cursor):
        def execute(self, query, params=None, **kwargs):  # type: ignore[no-untyped-def]
            statements.append(str(query))
            return super().execute(query, params, **kwargs)

    return psycopg.connect(dsn, autocommit=True, cursor_factory=CountingCursor), statements


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text[:200]
    return response.content


# --- presigning --------------------------------------------------------------------------------


def test_presign_instances_of_b_and_a_each_with_its_own_identity(env: Env, rows: Rows, db) -> None:
    files = {
        (B_BUCKET, "2026/11/19/stu_8f2/ser_01/img_0001.dcm"): b"DICM-b-1",
        (B_BUCKET, "2026/11/19/stu 8f2/ser+01/img=ü#?&0002.dcm"): b"DICM-b-2 \x00\xff",
        (A_BUCKET, "uploads/a/0001.dcm"): b"DICM-a-1",
    }
    ids = {}
    for (bucket, key), body in files.items():
        env.put(bucket, key, body)
        ids[(bucket, key)] = rows.instance(bucket, key, source="a" if bucket == A_BUCKET else "b")

    for (bucket, key), id_ in ids.items():
        url = presign_instance(db, id_)
        keys = A_KEYS if bucket == A_BUCKET else B_KEYS
        verify_presigned_get(
            url, access_key=keys[0], secret_key=keys[1], host=env.host, path=s3_path(bucket, key), expires=300
        )
        assert fetch(url) == files[(bucket, key)]
        # The other source's identity must not have signed it.
        other = B_KEYS if keys is A_KEYS else A_KEYS
        with pytest.raises(BadUrl):
            verify_presigned_get(
                url,
                access_key=other[0],
                secret_key=other[1],
                host=env.host,
                path=s3_path(bucket, key),
                expires=300,
            )

    url = presign_instance(db, next(iter(ids.values())), expires_in=3600)
    assert "X-Amz-Expires=3600" in url


def test_hook_forces_sigv4_even_when_the_connection_asks_for_sigv2(env: Env) -> None:
    env.monkeypatch.setenv(
        "AIRFLOW_CONN_MEDSYNC_B_AWS",
        _aws_conn(
            env.endpoint,
            B_KEYS,
            config_kwargs={"signature_version": "s3", "s3": {"addressing_style": "path"}},
        ),
    )
    env.put(B_BUCKET, "k/1.dcm", b"one")
    hook = InstanceFileHook("b")
    url = hook.presign(B_BUCKET, "k/1.dcm", expires_in=60)
    verify_presigned_get(
        url,
        access_key=B_KEYS[0],
        secret_key=B_KEYS[1],
        host=env.host,
        path=s3_path(B_BUCKET, "k/1.dcm"),
        expires=60,
    )
    assert "Signature=" in url and "AWSAccessKeyId" not in url
    assert fetch(url) == b"one"
    config = hook.get_conn().meta.config
    assert config.signature_version == "s3v4"
    assert (config.connect_timeout, config.read_timeout) == (5.0, 15.0)
    assert config.s3 == {"addressing_style": "path"}  # the connection's other settings still apply
    assert hook.get_conn().meta.region_name == REGION


@pytest.mark.parametrize(
    ("bucket", "key", "expires", "message"),
    [
        ("someone-elses-bucket", "k/1.dcm", None, "not allowed for source 'b'"),
        (A_BUCKET, "k/1.dcm", None, "not allowed for source 'b'"),  # A's bucket is not B's
        (B_BUCKET, "", None, "empty"),
        (B_BUCKET, "/k/1.dcm", None, "starts with '/'"),
        (B_BUCKET, "k/../../a-imaging-dev/x", None, "'..' segment"),
        (B_BUCKET, "..", None, "'..' segment"),
        (B_BUCKET, "k/./1.dcm", None, "'.' segment"),
        (B_BUCKET, "k//1.dcm", None, "empty segment"),
        (B_BUCKET, "k/", None, "empty segment"),
        (B_BUCKET, "k/1.dcm", 0, "positive"),
        (B_BUCKET, "k/1.dcm", -5, "positive"),
        (B_BUCKET, "k/1.dcm", 3601, "over the cap of 3600"),
        (B_BUCKET, "k/1.dcm", True, "whole number"),
        (B_BUCKET, "k/1.dcm", 2.5, "whole number"),
    ],
)
def test_presign_refuses(env: Env, bucket: str, key: str, expires, message: str) -> None:
    with pytest.raises(StorageError, match=re.escape(message)):
        InstanceFileHook("b").presign(bucket, key, expires_in=expires)


def test_key_rules() -> None:
    assert key_problem("2026/11/19/stu_8f2/ser_01/img_0001.dcm") is None
    assert key_problem("a..b/c.d/...") is None  # dots inside a segment are fine
    assert key_problem(None) == "the storage key is empty"
    assert "1024" in str(key_problem("x" * 1025))


def test_expiry_cap_is_configurable() -> None:
    policy = PresignPolicy(default_expires_seconds=60, max_expires_seconds=120)
    assert policy.expiry(None) == 60
    assert policy.expiry(120) == 120
    with pytest.raises(StorageError, match="cap of 120"):
        policy.expiry(121)
    with pytest.raises(ValueError, match="must not exceed"):
        PresignPolicy(default_expires_seconds=600, max_expires_seconds=300)
    with pytest.raises(ValueError):
        PresignPolicy(max_expires_seconds=7 * 24 * 3600 + 1)


def test_variables_override_bucket_and_allowlist_per_environment(env: Env) -> None:
    env.put("b-imaging-staging", "k/1.dcm", b"staging")
    env.put("b-imaging-old", "k/1.dcm", b"old")
    assert InstanceFileHook("b").allowed_buckets == {B_BUCKET}  # the file's default

    env.set_variable("medsync_b_bucket", "b-imaging-staging")
    hook = InstanceFileHook("b")
    assert hook.bucket == "b-imaging-staging"
    with pytest.raises(StorageError, match="not allowed"):
        hook.presign(B_BUCKET, "k/1.dcm")
    assert fetch(hook.presign("b-imaging-staging", "k/1.dcm")) == b"staging"

    env.set_variable("medsync_b_allowed_buckets", "b-imaging-old, ")
    hook = InstanceFileHook("b")
    assert hook.allowed_buckets == {"b-imaging-staging", "b-imaging-old"}
    assert fetch(hook.presign("b-imaging-old", "k/1.dcm")) == b"old"


def test_presign_instance_refuses_unknown_deleted_and_bad_rows(env: Env, rows: Rows, db) -> None:
    deleted = rows.instance(B_BUCKET, "k/1.dcm", deleted=True)
    foreign = rows.instance("someone-elses-bucket", "k/2.dcm")
    slash = rows.instance(B_BUCKET, "/k/3.dcm")  # A's schema does not stop it; the hook does
    escaping = rows.instance(B_BUCKET, "k/../../x")
    unknown_source = rows.instance(B_BUCKET, "k/4.dcm", source="c")
    unknown = uuid.uuid4()
    cases = {
        unknown: f"instance {unknown} does not exist",
        deleted: f"instance {deleted} is deleted",
        foreign: "bucket 'someone-elses-bucket' is not allowed for source 'b'",
        slash: "starts with '/'",
        escaping: "'..' segment",
        unknown_source: "no storage config for source 'c'",
        "not-a-uuid": "is not an instance id",
    }
    for id_, message in cases.items():
        with pytest.raises(StorageError, match=re.escape(message)):
            presign_instance(db, id_)
    with pytest.raises(StorageError, match="over the cap"):
        presign_instance(db, deleted, expires_in=3601)


def test_batch_is_one_query_and_one_client_per_source(env: Env, rows: Rows, a_db: str) -> None:
    wanted: list[uuid.UUID | str] = []
    bodies = {}
    for i in range(12):
        bucket, source = (A_BUCKET, "a") if i % 3 == 0 else (B_BUCKET, "b")
        key = f"s/{i}.dcm"
        env.put(bucket, key, f"body {i}".encode())
        id_ = rows.instance(bucket, key, source=source)
        wanted.append(id_)
        bodies[id_] = (bucket, key, source, f"body {i}".encode())
    deleted = rows.instance(B_BUCKET, "s/deleted.dcm", deleted=True)
    unknown = uuid.uuid4()
    wanted[3:3] = [deleted, unknown, "nope", str(wanted[0])]  # and a duplicate, as text

    hooks = SourceHooks()
    conn, statements = counting_connection(a_db)
    with conn:
        batch = presign_instances(conn, wanted, expires_in=120, hooks=hooks)

    assert len(statements) == 1 and "ANY" in statements[0]
    assert hooks.sources == ("a", "b")  # one hook, so one S3 client, per source
    assert list(batch.urls) == [i for i in wanted if i in bodies]  # request order, duplicate dropped
    assert set(batch.refused) == {deleted, unknown, "nope"}
    assert "is deleted" in batch.refused[deleted] and "does not exist" in batch.refused[unknown]
    for id_, url in batch.urls.items():
        bucket, key, source, body = bodies[id_]
        keys = A_KEYS if source == "a" else B_KEYS
        verify_presigned_get(
            url, access_key=keys[0], secret_key=keys[1], host=env.host, path=s3_path(bucket, key), expires=120
        )
        assert fetch(url) == body
    with pytest.raises(StorageError, match="is deleted"):
        batch.raise_for_refused()

    # A SourceHooks shared by several calls keeps one client per source across them.
    hooks = SourceHooks()
    conn, statements = counting_connection(a_db)
    with conn:
        assert len(presign_instances(conn, wanted, hooks=hooks).urls) == len(bodies)
        clients = {source: hooks[source].get_conn() for source in hooks.sources}
        for _ in range(2):
            assert len(presign_instances(conn, wanted, hooks=hooks).urls) == len(bodies)
        assert presign_instances(conn, [], hooks=hooks).urls == {}
    assert len(statements) == 3
    assert hooks.sources == ("a", "b")
    assert all(hooks[source].get_conn() is client for source, client in clients.items())


def test_presign_sequence(env: Env, rows: Rows, a_db: str, db) -> None:
    seq = rows.sequence("b")
    ids = []
    for number in (3, 1, 2):
        env.put(B_BUCKET, f"q/{number}.dcm", str(number).encode())
        ids.append(rows.instance(B_BUCKET, f"q/{number}.dcm", sequence=seq, number=number))
    rows.instance(B_BUCKET, "q/9.dcm", sequence=seq, number=9, deleted=True)
    bad = rows.instance("someone-elses-bucket", "q/4.dcm", sequence=seq, number=4)

    conn, statements = counting_connection(a_db)
    with conn:
        batch = presign_sequence(conn, seq)
    assert len(statements) == 1
    assert [fetch(u) for u in batch.urls.values()] == [b"1", b"2", b"3"]  # instance_number order
    for number, url in zip((1, 2, 3), batch.urls.values(), strict=True):
        verify_presigned_get(
            url,
            access_key=B_KEYS[0],
            secret_key=B_KEYS[1],
            host=env.host,
            path=s3_path(B_BUCKET, f"q/{number}.dcm"),
            expires=300,
        )
    assert list(batch.refused) == [bad]

    with pytest.raises(StorageError, match="does not exist"):
        presign_sequence(db, uuid.uuid4())
    with pytest.raises(StorageError, match="is deleted"):
        presign_sequence(db, rows.sequence("b", deleted=True))
    assert presign_sequence(db, rows.sequence("b")).urls == {}  # live, no instances


def test_missing_connection_is_an_error_not_the_default_identity(env: Env) -> None:
    env.monkeypatch.delenv("AIRFLOW_CONN_MEDSYNC_B_AWS")
    with pytest.raises(StorageError, match="AWS connection 'medsync_b_aws' for source 'b' not found"):
        InstanceFileHook("b").presign(B_BUCKET, "k/1.dcm")


def test_never_returns_none(env: Env, monkeypatch) -> None:
    # S3Hook.generate_presigned_url answers None on a ClientError: the hook turns it into an error.
    monkeypatch.setattr("airflow.providers.amazon.aws.hooks.s3.S3Hook.generate_presigned_url", lambda *a, **k: None)
    with pytest.raises(StorageError, match="signing failed"):
        InstanceFileHook("b").presign(B_BUCKET, "k/1.dcm")


def test_no_credentials_is_an_error(env: Env) -> None:
    env.monkeypatch.setenv(
        "AIRFLOW_CONN_MEDSYNC_B_AWS",
        json.dumps({"conn_type": "aws", "extra": {"endpoint_url": env.endpoint, "region_name": REGION}}),
    )
    env.monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    env.monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="NoCredentialsError"):
        InstanceFileHook("b").presign(B_BUCKET, "k/1.dcm")


def test_logs_carry_no_secret_signature_or_key(env: Env, rows: Rows, db, caplog) -> None:
    env.put(B_BUCKET, "secret-ish/key.dcm", b"x")
    ok = rows.instance(B_BUCKET, "secret-ish/key.dcm")
    refused = rows.instance("someone-elses-bucket", "secret-ish/other.dcm")
    # Ours at DEBUG, everyone else's at INFO (botocore's DEBUG logs print signed requests by
    # design; werkzeug's access log is moto's, the server's, side).
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="medsync"):
        batch = presign_instances(db, [ok, refused])
        check_instance_files(
            db, get_source_config("b"), changed_since=datetime.now(UTC) - timedelta(hours=1), sample_size=5
        )
    assert batch.urls and batch.refused
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("werkzeug"))
    assert str(refused) in text  # ids are fine
    for forbidden in (B_KEYS[1], "X-Amz-Signature", "Signature=", "secret-ish"):
        assert forbidden not in text


# --- reachability check -------------------------------------------------------------------------


@contextmanager
def iam_enforced(env: Env) -> Iterator[None]:
    """B's identity becomes an IAM user that may read B's bucket only, and moto enforces IAM.

    Enter it after the setup: from then on the admin keys are refused too.
    """
    iam = boto3.client(
        "iam",
        endpoint_url=env.endpoint,
        region_name=REGION,
        aws_access_key_id="admin",
        aws_secret_access_key="x",
    )
    iam.create_user(UserName="medsync-b-reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{B_BUCKET}", f"arn:aws:s3:::{B_BUCKET}/*"],
            }
        ],
    }
    iam.put_user_policy(UserName="medsync-b-reader", PolicyName="read-b", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="medsync-b-reader")["AccessKey"]
    env.monkeypatch.setenv(
        "AIRFLOW_CONN_MEDSYNC_B_AWS", _aws_conn(env.endpoint, (key["AccessKeyId"], key["SecretAccessKey"]))
    )
    requests.post(f"{env.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{env.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_file_check_counts_missing_denied_refused(env: Env, rows: Rows, db) -> None:
    env.set_variable("medsync_b_allowed_buckets", "b-imaging-old")  # allowed by config, not granted by IAM
    since = datetime.now(UTC) - timedelta(minutes=5)
    old = since - timedelta(days=1)
    for i in range(4):
        env.put(B_BUCKET, f"ok/{i}.dcm", b"x")
        rows.instance(B_BUCKET, f"ok/{i}.dcm")
    for i in range(7):
        rows.instance(B_BUCKET, f"missing/{i}.dcm")
    env.put("b-imaging-old", "old/0.dcm", b"x")
    rows.instance("b-imaging-old", "old/0.dcm")
    rows.instance("someone-elses-bucket", "foreign/0.dcm")
    # Not sampled: written before the run, deleted, or another source's.
    rows.instance(B_BUCKET, "missing/old.dcm", updated_at=old)
    rows.instance(B_BUCKET, "missing/deleted.dcm", deleted=True)
    rows.instance(A_BUCKET, "missing/a.dcm", source="a")

    cfg = get_source_config("b")
    with iam_enforced(env):
        result = check_instance_files(db, cfg, changed_since=since, sample_size=100)
        sample = check_instance_files(db, cfg, changed_since=since, sample_size=3)
    assert (result.candidates, result.checked, result.ok) == (13, 13, 4)
    assert (result.missing, result.denied, result.refused, result.errors) == (7, 1, 1, 0)
    assert len(result.examples["missing"]) == 5
    assert all(e.startswith(f"s3://{B_BUCKET}/missing/") for e in result.examples["missing"])
    assert result.examples["denied"] == ["s3://b-imaging-old/old/0.dcm"]
    assert result.examples["refused"] == ["s3://someone-elses-bucket/foreign/0.dcm"]
    assert result.failures == 9
    assert result.failed(cfg.file_check.max_failures)
    assert not result.failed(9)
    assert json.loads(json.dumps(result.as_dict()))["denied"] == 1
    assert (sample.candidates, sample.checked) == (13, 3)


def test_file_check_all_present_and_edge_cases(env: Env, rows: Rows, db) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(3):
        env.put(B_BUCKET, f"ok/{i}.dcm", b"x")
        rows.instance(B_BUCKET, f"ok/{i}.dcm")
    cfg = get_source_config("b")
    result = check_instance_files(db, cfg, changed_since=since, sample_size=20)
    assert (result.checked, result.ok, result.failures) == (3, 3, 0)
    assert not result.failed(0)

    later = check_instance_files(db, cfg, changed_since=datetime.now(UTC) + timedelta(minutes=1), sample_size=20)
    assert later.checked == 0 and not later.failed(0)
    assert check_instance_files(db, cfg, changed_since=since, sample_size=0).checked == 0
    with pytest.raises(StorageError, match="timezone-aware"):
        check_instance_files(db, cfg, changed_since=datetime.now(), sample_size=5)


def test_file_check_other_errors_via_stub(env: Env, rows: Rows, db) -> None:
    # moto cannot be made to answer 500: a botocore Stubber on the hook's client does.
    rows.instance(B_BUCKET, "e/1.dcm")
    hook = InstanceFileHook("b")
    with Stubber(hook.get_conn()) as stub:
        stub.add_client_error("head_object", service_error_code="InternalError", http_status_code=500)
        result = check_instance_files(
            db,
            get_source_config("b"),
            changed_since=datetime.now(UTC) - timedelta(hours=1),
            sample_size=5,
            hook=hook,
        )
    assert (result.errors, result.examples["error"]) == (1, [f"s3://{B_BUCKET}/e/1.dcm"])
    assert result.failed(0)


# --- the support CLI ---------------------------------------------------------------------------


def _set_db_connection(monkeypatch, a_db: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(a_db)
    conn = {
        "conn_type": "postgres",
        "host": params.get("host"),
        "port": int(params.get("port", 5432)),
        "login": params.get("user"),
        "password": params.get("password"),
        "schema": params["dbname"],
    }
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", json.dumps(conn))


def test_cli_prints_urls_or_fails_with_the_reason(env: Env, rows: Rows, a_db: str, capsys, monkeypatch) -> None:
    from medsync import presign_cli

    _set_db_connection(monkeypatch, a_db)
    env.put(B_BUCKET, "cli/1.dcm", b"one")
    env.put(A_BUCKET, "cli/2.dcm", b"two")
    first = rows.instance(B_BUCKET, "cli/1.dcm")
    second = rows.instance(A_BUCKET, "cli/2.dcm", source="a")
    deleted = rows.instance(B_BUCKET, "cli/3.dcm", deleted=True)

    assert presign_cli.main([str(first), str(second), "--expires", "60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [fetch(u) for u in out] == [b"one", b"two"]
    verify_presigned_get(
        out[0],
        access_key=B_KEYS[0],
        secret_key=B_KEYS[1],
        host=env.host,
        path=s3_path(B_BUCKET, "cli/1.dcm"),
        expires=60,
    )
    verify_presigned_get(
        out[1],
        access_key=A_KEYS[0],
        secret_key=A_KEYS[1],
        host=env.host,
        path=s3_path(A_BUCKET, "cli/2.dcm"),
        expires=60,
    )

    assert presign_cli.main([str(first), str(deleted)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: instance {deleted} is deleted" in captured.err

    assert presign_cli.main([str(first), "--expires", "99999"]) == 1
    assert "over the cap" in capsys.readouterr().err


def test_cli_as_a_module_keeps_stdout_for_urls(env: Env, rows: Rows, a_db: str, monkeypatch) -> None:
    # The real thing, once: a new process, Airflow's logging on, connections from the environment.
    _set_db_connection(monkeypatch, a_db)
    env.put(B_BUCKET, "cli/x.dcm", b"module")
    id_ = rows.instance(B_BUCKET, "cli/x.dcm")
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    done = subprocess.run(
        [sys.executable, "-m", "medsync.presign_cli", str(id_)],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (url,) = done.stdout.splitlines()
    verify_presigned_get(
        url,
        access_key=B_KEYS[0],
        secret_key=B_KEYS[1],
        host=env.host,
        path=s3_path(B_BUCKET, "cli/x.dcm"),
        expires=300,
    )
    assert fetch(url) == b"module"
    assert "AWS Connection" in done.stderr  # Airflow's logs went to stderr, not into the output
