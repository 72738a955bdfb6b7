"""How S3 answers become pgvault errors.

moto_server grants every request, so "access denied" and "bad credentials" cannot be produced by
the real endpoint here: these tests hand the backend the ClientError botocore raises for such an
answer (a stand-in for the store, said so), and check the one-line error the user gets.
"""

from __future__ import annotations

from typing import Any

import botocore.exceptions
import pytest

from pgvault.config import S3Config
from pgvault.errors import ObjectExists, ObjectNotFound, RepositoryError, TransientError
from pgvault.repo.retry import Throttled
from pgvault.repo.s3 import S3Storage


class _Meta:
    endpoint_url = "https://user:hunter2@store.example.net:9000"


class _Client:
    meta = _Meta()


def _storage() -> S3Storage:
    return S3Storage(S3Config(), "acme-pgvault", "prod", client=_Client())


def _answer(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def _raise(exc: Exception) -> Any:
    def fn() -> Any:
        raise exc
    return fn


@pytest.mark.parametrize(("operation", "permission"), [
    ("PutObject", "s3:PutObject"), ("HeadObject", "s3:GetObject"), ("ListObjectsV2", "s3:ListBucket"),
    ("DeleteObjects", "s3:DeleteObject"), ("ListMultipartUploads", "s3:ListBucketMultipartUploads"),
])
def test_access_denied_names_the_bucket_and_the_permission(operation: str, permission: str) -> None:
    with pytest.raises(RepositoryError) as caught:
        _storage()._translated(operation, "main/cluster.json", _raise(_answer("AccessDenied", 403, operation)))
    assert caught.value.message == (f"access denied: {operation} on s3://acme-pgvault/prod/main/cluster.json "
                                    f"needs {permission} on bucket 'acme-pgvault'")


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("SlowDown", 503, Throttled), ("503", 503, Throttled), ("InternalError", 500, TransientError),
    ("BadGateway", 502, TransientError), ("RequestTimeout", 400, TransientError),
    ("NoSuchKey", 404, ObjectNotFound), ("PreconditionFailed", 412, ObjectExists),
])
def test_answers_are_classified(code: str, status: int, kind: type[Exception]) -> None:
    with pytest.raises(kind):
        _storage()._translated("GetObject", "k", _raise(_answer(code, status, "GetObject")))


def test_rejected_credentials_and_missing_bucket_are_plain_errors_without_secrets() -> None:
    with pytest.raises(RepositoryError) as caught:
        _storage()._translated("PutObject", "k", _raise(_answer("InvalidAccessKeyId", 403, "PutObject")))
    assert not isinstance(caught.value, TransientError)
    assert "rejected the credentials (InvalidAccessKeyId)" in caught.value.message
    with pytest.raises(RepositoryError, match="bucket 'acme-pgvault' does not exist"):
        _storage()._translated("GetObject", "k", _raise(_answer("NoSuchBucket", 404, "GetObject")))


def test_connection_errors_are_transient_and_name_the_endpoint_without_its_password() -> None:
    error = botocore.exceptions.EndpointConnectionError(endpoint_url="https://store.example.net:9000")
    with pytest.raises(TransientError) as caught:
        _storage()._translated("PutObject", "k", _raise(error))
    assert "https://store.example.net:9000" in caught.value.message
    assert "hunter2" not in caught.value.message and "user" not in caught.value.message


def test_a_body_cut_off_is_transient() -> None:
    # What botocore raises when a response body ends before its Content-Length (seen through the
    # fault proxy's "truncate" in the S3 integration tests).
    error = botocore.exceptions.IncompleteReadError(actual_bytes=0, expected_bytes=212)
    with pytest.raises(TransientError, match="the answer was cut off"):
        _storage()._translated("GetObject", "k.meta", _raise(error))


def test_a_reset_while_botocore_reads_an_error_answer_is_transient() -> None:
    # botocore reads a 404's XML body itself; a reset there came out of urllib3 unwrapped and ended
    # a wal-fetch with 255 instead of being retried (seen through the fault proxy under prefetch).
    import urllib3.exceptions

    reset = ConnectionResetError(104, "Connection reset by peer")
    error = urllib3.exceptions.ProtocolError(f"Connection broken: {reset!r}", reset)
    with pytest.raises(TransientError, match="the connection broke"):
        _storage()._translated("GetObject", "c/wal/00000002.history", _raise(error))
    with pytest.raises(TransientError):
        _storage()._translated("GetObject", "c/wal/00000002.history", _raise(reset))
