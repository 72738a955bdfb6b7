"""FaultProxy, the test helper between boto3 and moto_server: it passes S3 traffic through untouched, and
injects exactly the faults it is told to (503, 500, reset, stall, truncated body, lost acknowledgement).
"""

from __future__ import annotations

import http.client
import io
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from faultproxy import FAULT_KINDS, FaultProxy
from urllib3.exceptions import ProtocolError

try:
    from botocore.exceptions import ResponseStreamingError
except ImportError:  # botocore before 1.29
    ResponseStreamingError = ProtocolError  # type: ignore[misc,assignment]

MIB = 1024 * 1024
CONNECTION_ERRORS = (HTTPClientError, BotoConnectionError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def _moto_port() -> Iterator[int]:
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # any HTTP answer means it is up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto_server did not answer within 20 s")
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _s3(endpoint: str, *, read_timeout: float = 2) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=botocore.config.Config(
            retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=read_timeout
        ),
    )


@pytest.fixture
def proxy(_moto_port: int) -> Iterator[FaultProxy]:
    with FaultProxy(_moto_port, seed=1) as p:
        yield p


@pytest.fixture(scope="module")
def direct(_moto_port: int) -> Any:
    """A client straight to moto, for setting up and for checking what really got stored."""
    return _s3(f"http://127.0.0.1:{_moto_port}")


@pytest.fixture
def client(proxy: FaultProxy) -> Any:
    return _s3(proxy.url)


@pytest.fixture
def bucket(direct: Any) -> str:
    name = f"faultproxy-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=name)
    return name


def test_without_faults_put_get_head_list_pass_through(proxy, client, bucket):
    client.put_object(Bucket=bucket, Key="a/one", Body=b"first")
    client.put_object(Bucket=bucket, Key="a/two", Body=io.BytesIO(b"second"))  # file-like: Expect: 100-continue

    assert client.get_object(Bucket=bucket, Key="a/one")["Body"].read() == b"first"
    assert client.head_object(Bucket=bucket, Key="a/two")["ContentLength"] == len(b"second")
    listed = client.list_objects_v2(Bucket=bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/one", "a/two"]
    with pytest.raises(ClientError) as missing:
        client.head_object(Bucket=bucket, Key="a/none")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert proxy.stats["requests"] == 6
    assert proxy.stats["faults"] == 0


def test_without_faults_multipart_upload_and_a_1mib_get_pass_through(client, direct, bucket):
    parts = [bytes([n]) * (5 * MIB) for n in (1, 2)]
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")
    etags = [
        client.upload_part(Bucket=bucket, Key="big", UploadId=upload["UploadId"], PartNumber=n, Body=data)["ETag"]
        for n, data in enumerate(parts, start=1)
    ]
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="big",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]},
    )
    assert direct.get_object(Bucket=bucket, Key="big")["Body"].read() == b"".join(parts)

    blob = bytes(range(256)) * (MIB // 256)
    direct.put_object(Bucket=bucket, Key="blob", Body=blob)
    assert client.get_object(Bucket=bucket, Key="blob")["Body"].read() == blob


def test_chunked_request_bodies_and_keep_alive_connections_are_relayed(proxy, direct, bucket):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        body = iter([b"hello, ", b"chunked ", b"world"])
        # Unsigned, so moto treats it as anonymous: public-read lets the GET below through.
        conn.request("PUT", f"/{bucket}/chunked", body=body, headers={"x-amz-acl": "public-read"}, encode_chunked=True)
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        conn.request("GET", f"/{bucket}/chunked")  # the same connection, kept alive
        second = conn.getresponse()
        assert (second.status, second.read()) == (200, b"hello, chunked world")
    finally:
        conn.close()
    assert direct.get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"hello, chunked world"


@pytest.mark.parametrize(
    ("kind", "code", "status"), [("503", "SlowDown", 503), ("500", "InternalError", 500)]
)
def test_error_faults_answer_like_s3_without_forwarding(proxy, client, direct, bucket, kind, code, status):
    proxy.set_faults(1.0, (kind,))
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="never", Body=b"x")
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert proxy.stats[kind] == 1


def test_reset_fault_is_a_connection_error_and_nothing_is_stored(proxy, client, direct, bucket):
    proxy.set_faults(1.0, ("reset",))
    with pytest.raises(CONNECTION_ERRORS):
        client.put_object(Bucket=bucket, Key="never", Body=b"x")
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert proxy.stats["reset"] == 1


def test_stall_fault_trips_the_clients_read_timeout(proxy, bucket):
    proxy.set_faults(1.0, ("stall",), stall_seconds=4)
    impatient = _s3(proxy.url, read_timeout=1)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        impatient.list_objects_v2(Bucket=bucket)
    assert 0.9 <= time.monotonic() - started < 2.5


def test_reset_after_fault_loses_the_acknowledgement_but_the_object_is_stored(proxy, client, direct, bucket):
    proxy.set_faults(1.0, ("reset-after",))
    with pytest.raises(CONNECTION_ERRORS):
        client.put_object(Bucket=bucket, Key="acked-lost", Body=b"it did arrive")
    assert direct.get_object(Bucket=bucket, Key="acked-lost")["Body"].read() == b"it did arrive"


def test_truncate_fault_breaks_a_get_body_mid_stream(proxy, client, direct, bucket):
    direct.put_object(Bucket=bucket, Key="blob", Body=b"z" * MIB)
    proxy.set_faults(1.0, ("truncate",))
    response = client.get_object(Bucket=bucket, Key="blob")  # status and headers arrive intact
    assert response["ContentLength"] == MIB
    with pytest.raises((ResponseStreamingError, IncompleteReadError, ProtocolError)):
        response["Body"].read()


def test_truncate_fault_without_a_body_resets_after_forwarding(proxy, client, direct, bucket):
    proxy.set_faults(1.0, ("truncate",))
    with pytest.raises(CONNECTION_ERRORS):
        client.put_object(Bucket=bucket, Key="acked-lost", Body=b"stored anyway")
    assert direct.get_object(Bucket=bucket, Key="acked-lost")["Body"].read() == b"stored anyway"


def _fault_pattern(proxy: FaultProxy, client: Any, n: int) -> list[bool]:
    pattern = []
    for _ in range(n):
        try:
            client.list_buckets()
            pattern.append(False)
        except ClientError as err:
            assert err.response["Error"]["Code"] == "SlowDown"
            pattern.append(True)
    return pattern


def test_fault_rate_is_roughly_honoured_and_repeatable_by_seed(_moto_port):
    patterns = []
    for _ in range(2):
        with FaultProxy(_moto_port, seed=42) as proxy:
            proxy.set_faults(0.2, ("503",))
            patterns.append(_fault_pattern(proxy, _s3(proxy.url), 200))
            stats = proxy.stats
            assert stats["requests"] == 200
            assert stats["faults"] == stats["503"] == sum(patterns[-1])
            assert 20 <= stats["faults"] <= 60
    assert patterns[0] == patterns[1]


def test_outage_faults_every_request_until_it_is_over(proxy, client):
    client.list_buckets()
    proxy.outage(True)
    for _ in range(3):
        with pytest.raises(CONNECTION_ERRORS):
            client.list_buckets()
    proxy.outage(True, kind="503")
    with pytest.raises(ClientError) as err:
        client.list_buckets()
    assert err.value.response["Error"]["Code"] == "SlowDown"
    proxy.outage(False)
    client.list_buckets()
    assert proxy.stats == {**dict.fromkeys(FAULT_KINDS, 0), "requests": 6, "faults": 4, "reset": 3, "503": 1}


def test_stats_count_requests_and_faults_per_kind_and_reset_to_zero(proxy, client, bucket):
    proxy.set_faults(1.0, ("500",))
    for _ in range(2):
        with pytest.raises(ClientError):
            client.head_bucket(Bucket=bucket)
    proxy.set_faults(0.0)
    client.head_bucket(Bucket=bucket)
    assert proxy.stats == {**dict.fromkeys(FAULT_KINDS, 0), "requests": 3, "faults": 2, "500": 2}

    proxy.reset_stats()
    assert proxy.stats == {**dict.fromkeys(FAULT_KINDS, 0), "requests": 0, "faults": 0}


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.set_faults(1.5),
        lambda p: p.set_faults(-0.1),
        lambda p: p.set_faults(0.5, ()),
        lambda p: p.set_faults(0.5, ("timeout",)),
        lambda p: p.outage(True, kind="boom"),
    ],
)
def test_bad_fault_settings_are_refused(call):
    with pytest.raises(ValueError):
        call(FaultProxy(1))


def test_stop_ends_a_stall_and_closes_idle_connections(_moto_port):
    proxy = FaultProxy(_moto_port).start()
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    stalled = socket.create_connection(("127.0.0.1", proxy.port))
    proxy.set_faults(1.0, ("stall",), stall_seconds=30)
    stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    started = time.monotonic()
    proxy.stop()
    try:
        for s in (idle, stalled):
            s.settimeout(2)
            assert s.recv(1) == b""
    finally:
        idle.close()
        stalled.close()
    assert time.monotonic() - started < 2
