"""A repository in an S3 bucket (AWS, MinIO, Ceph RGW and other S3-compatible stores).

Objects carry their SHA-256 and size as user metadata. A streamed object larger than one chunk
is a multipart upload, whose SHA-256 is only known at its end: it gets a `<key>.meta` sidecar,
the same JSON as the file backend's. Every request goes through the retry policy; reads resume
with a ranged GET where a connection broke.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlparse

from pgvault.errors import ConfigError, ObjectExists, ObjectNotFound, RepositoryError, TransientError
from pgvault.repo.base import ObjectInfo, ObjectMeta
from pgvault.repo.retry import RetryPolicy, Throttled

if TYPE_CHECKING:
    from pgvault.config import S3Config

T = TypeVar("T")

META_SUFFIX = ".meta"
SHA_KEY = "pgvault-sha256"
SIZE_KEY = "pgvault-size"
EXTRA_PREFIX = "x-"  # extra metadata keys, '_' written as '-' (proxies drop headers with '_')
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys

# The permission each request needs: named in "access denied" errors, and in docs/s3.md.
PERMISSIONS = {
    "HeadObject": "s3:GetObject", "GetObject": "s3:GetObject", "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListObjectsV2": "s3:ListBucket", "HeadBucket": "s3:ListBucket", "DeleteObjects": "s3:DeleteObject",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "503", "429"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                    "OperationAborted", "500", "502", "504"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired"}


def make_client(config: S3Config) -> Any:
    """A boto3 S3 client: the policy's settings over boto3's standard configuration chain."""
    import boto3
    import botocore.config
    import botocore.exceptions

    try:
        session = boto3.session.Session(
            profile_name=config.profile,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key.get_secret_value() if config.secret_access_key else None,
            aws_session_token=config.session_token.get_secret_value() if config.session_token else None,
            region_name=config.region,
        )
        settings = botocore.config.Config(
            connect_timeout=config.connect_timeout.total_seconds(),
            read_timeout=config.read_timeout.total_seconds(),
            # pgvault's RetryPolicy is the one retry layer: it can resume reads and retry one chunk.
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": config.addressing_style},
            max_pool_connections=32,
            user_agent_extra="pgvault",
        )
        return session.client("s3", endpoint_url=config.endpoint_url, config=settings,
                              verify=str(config.ca_bundle) if config.ca_bundle else None)
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(f"repository.s3.profile: profile {config.profile!r} is not in the AWS config files; "
                          "fix the name or remove it") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(f"repository.s3: cannot set up the S3 client: {exc}") from None


class S3Storage:
    def __init__(self, config: S3Config, bucket: str, prefix: str, *, client: Any = None,
                 retry: RetryPolicy | None = None) -> None:
        self.config = config
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = client if client is not None else make_client(config)
        self.retry = retry or RetryPolicy(retries=config.retries, window=config.retry_window.total_seconds())
        self.chunk_size = config.multipart_chunk_size
        self._bucket_seen = False

    # --- requests -------------------------------------------------------------------------------

    def _endpoint(self) -> str:
        """The endpoint in use, wherever it came from (policy, AWS_ENDPOINT_URL*, config files), sans userinfo."""
        parsed = urlparse(str(self.client.meta.endpoint_url))
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl() \
            if parsed.hostname else str(self.client.meta.endpoint_url)

    def _url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _call(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        """One request, retried on transient failures, its errors translated."""
        return self.retry.call(lambda: self._translated(operation, key, fn), f"S3 {operation} {self._url(key)}")

    def _translated(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        import botocore.exceptions
        import urllib3.exceptions

        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc, operation, key) from None
        except botocore.exceptions.SSLError as exc:
            # A certificate or protocol mismatch does not heal with retries.
            raise RepositoryError(f"TLS with the S3 endpoint {self._endpoint()} failed: {_tls_reason(exc)}",
                                  hint="check repository.s3.endpoint_url (http or https) and repository.s3.ca_bundle "
                                  "(or AWS_CA_BUNDLE)") from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError) as exc:
            raise TransientError(f"{_describe_connection_error(exc)} (endpoint {self._endpoint()})",
                                 hint="check that the store is up and that repository.s3.endpoint_url (or "
                                 "AWS_ENDPOINT_URL_S3) names it; PostgreSQL keeps WAL and retries archive_command"
                                 ) from None
        except botocore.exceptions.NoCredentialsError:
            raise RepositoryError(
                f"no AWS credentials found for {self._url()}",
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment of the user "
                "running pgvault (PostgreSQL's user for archive_command), or repository.s3.profile") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise RepositoryError(f"S3 {operation} {self._url(key)} failed: {exc}") from None
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            # botocore reads an error answer's body (a 404's XML) itself; a reset there surfaces from
            # urllib3 unwrapped ("Connection broken"): the same transient fault, retried.
            raise TransientError(f"{_describe_connection_error(exc)} (endpoint {self._endpoint()})",
                                 hint="check that the store is up; PostgreSQL retries restore_command and "
                                 "archive_command") from None

    def _client_error(self, exc: Any, operation: str, key: str) -> RepositoryError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_CODES or status in (429, 503):
            return Throttled(f"the store asked to slow down ({code or status})")
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(f"the store answered {status} {code}".rstrip())
        if code == "NoSuchBucket":
            return RepositoryError(f"bucket {self.bucket!r} does not exist",
                                   hint=f"create it (aws s3 mb s3://{self.bucket}) or fix repository.url")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return ObjectNotFound(f"object {key} is not in the repository")
        if code in _CREDENTIAL_CODES:
            return RepositoryError(f"the S3 endpoint rejected the credentials ({code}) for {self._url()}",
                                   hint="check the access key, secret and session token pgvault is given")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            permission = PERMISSIONS.get(operation, operation)
            return RepositoryError(f"access denied: {operation} on {self._url(key)} needs {permission} on bucket "
                                   f"{self.bucket!r}", hint="grant it to this identity (docs/s3.md has the minimal "
                                   "IAM policy)")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectExists(f"object {key} already exists")
        message = str(error.get("Message") or "").strip()
        return RepositoryError(f"S3 {operation} {self._url(key)} failed: {code or status} {message}".rstrip())

    # --- the protocol ---------------------------------------------------------------------------

    def _write_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.config.storage_class:
            args["StorageClass"] = self.config.storage_class
        if self.config.sse != "none":
            args["ServerSideEncryption"] = self.config.sse
            if self.config.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return args

    def put(
        self, key: str, data: BinaryIO, *, extra: Mapping[str, str] | None = None, overwrite: bool = False
    ) -> ObjectMeta:
        conditional = not overwrite and self.config.conditional_writes
        if not overwrite and not conditional and self.head(key) is not None:
            raise ObjectExists(f"object {key} already exists")
        first = _read_up_to(data, self.chunk_size)
        if len(first) < self.chunk_size:
            return self._put_single(key, first, extra or {}, conditional)
        return self._put_multipart(key, first, data, extra or {}, conditional)

    def _put_single(self, key: str, body: bytes, extra: Mapping[str, str], conditional: bool) -> ObjectMeta:
        meta = ObjectMeta(size=len(body), sha256=hashlib.sha256(body).hexdigest(), extra=dict(extra))
        args = {"Bucket": self.bucket, "Key": self.prefix + key, "Body": body, "Metadata": _to_metadata(meta),
                **self._write_args()}
        if conditional:
            args["IfNoneMatch"] = "*"
        try:
            self._call("PutObject", key, lambda: self.client.put_object(**args))
        except ObjectExists:
            return self._existing(key, meta)
        return meta

    def _existing(self, key: str, ours: ObjectMeta) -> ObjectMeta:
        """A conditional write found the key taken: by us (a retried request whose answer was lost) or not."""
        stored = self.head(key)
        if stored is not None and stored.sha256 == ours.sha256 and stored.size == ours.size:
            return stored
        raise ObjectExists(f"object {key} already exists")

    def _put_multipart(self, key: str, first: bytes, data: BinaryIO, extra: Mapping[str, str],
                       conditional: bool) -> ObjectMeta:
        full = self.prefix + key
        created = self._call("CreateMultipartUpload", key, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full, Metadata={EXTRA_PREFIX + k.replace("_", "-"): v for k, v in extra.items()},
            **self._write_args()))
        upload_id = created["UploadId"]
        digest = hashlib.sha256()
        size = 0
        parts: list[dict[str, Any]] = []
        try:
            chunk = first
            while chunk:
                digest.update(chunk)
                size += len(chunk)
                number = len(parts) + 1
                body = chunk
                answer = self._call("UploadPart", key, lambda body=body, number=number: self.client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body))
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                chunk = _read_up_to(data, self.chunk_size)
            meta = ObjectMeta(size=size, sha256=digest.hexdigest(), extra=dict(extra))
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id,
                                    "MultipartUpload": {"Parts": parts}}
            if conditional:
                args["IfNoneMatch"] = "*"
            try:
                self._call("CompleteMultipartUpload", key, lambda: self.client.complete_multipart_upload(**args))
            except ObjectExists:
                self._abort(key, upload_id)
                raise
            except ObjectNotFound:
                # NoSuchUpload: an earlier try completed it and its answer was lost; it is ours if
                # the object now holds exactly what we sent.
                if self._measure(key) != (size, meta.sha256):
                    raise
        except BaseException:
            self._abort(key, upload_id)
            raise
        self._write_sidecar(key, meta, conditional)
        return meta

    def _abort(self, key: str, upload_id: str) -> None:
        # On failure it stays debris, which the next backup's sweep aborts.
        with contextlib.suppress(RepositoryError):
            self._call("AbortMultipartUpload", key, lambda: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id))

    def _write_sidecar(self, key: str, meta: ObjectMeta, conditional: bool = False) -> None:
        body = json.dumps({"size": meta.size, "sha256": meta.sha256, "extra": dict(meta.extra)}).encode()
        # Written once, like its object: a retried PUT whose first answer was lost finds its own
        # sidecar (412) instead of adding a second version of it.
        extra_args: dict[str, Any] = {"IfNoneMatch": "*"} if conditional else {}
        try:
            self._call("PutObject", key + META_SUFFIX, lambda: self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key + META_SUFFIX, Body=body, **extra_args,
                **self._write_args()))
        except ObjectExists:
            stored = self._sidecar_or_none(key)
            if stored is None or (stored.size, stored.sha256) != (meta.size, meta.sha256):
                raise

    def _sidecar_or_none(self, key: str) -> ObjectMeta | None:
        try:
            # Request and body in one retried unit: a body cut off mid-read needs a new GET.
            body = self._call("GetObject", key + META_SUFFIX, lambda: self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key + META_SUFFIX)["Body"].read())
            raw = json.loads(body)
            return ObjectMeta(size=int(raw["size"]), sha256=str(raw["sha256"]), extra=raw.get("extra") or {})
        except ObjectNotFound:
            return None
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(f"metadata of {self._url(key)} is unreadable; the repository is damaged") from None

    def _measure(self, key: str) -> tuple[int, str]:
        """Size and SHA-256 of the stored bytes, read in full (for objects whose sidecar is missing)."""
        digest = hashlib.sha256()
        size = 0
        with self._reader(key, None) as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def _meta_of(self, key: str, answer: Mapping[str, Any]) -> ObjectMeta:
        metadata = answer.get("Metadata") or {}
        extra = {k[len(EXTRA_PREFIX):].replace("-", "_"): v for k, v in metadata.items() if k.startswith(EXTRA_PREFIX)}
        if SHA_KEY in metadata:
            try:
                return ObjectMeta(size=int(metadata[SIZE_KEY]), sha256=metadata[SHA_KEY], extra=extra)
            except (KeyError, ValueError):
                raise RepositoryError(f"metadata of {self._url(key)} is unreadable; the repository is damaged") \
                    from None
        sidecar = self._sidecar_or_none(key)
        if sidecar is not None:
            return sidecar
        # A multipart upload completed but its sidecar never written (a writer killed in between):
        # describe the bytes as they are, as the file backend does for a missing sidecar.
        size, sha256 = self._measure(key)
        return ObjectMeta(size=size, sha256=sha256, extra=extra)

    def head(self, key: str) -> ObjectMeta | None:
        try:
            answer = self._call("HeadObject", key, lambda: self.client.head_object(
                Bucket=self.bucket, Key=self.prefix + key))
        except ObjectNotFound:
            # HEAD answers a bare 404 for a missing bucket too: tell the two apart once, or a
            # missing bucket would read as an empty repository ("not initialized").
            self._require_bucket()
            return None
        return self._meta_of(key, answer)

    def _require_bucket(self) -> None:
        if self._bucket_seen:
            return
        try:
            self._call("HeadBucket", "", lambda: self.client.head_bucket(Bucket=self.bucket))
        except ObjectNotFound:
            raise RepositoryError(f"bucket {self.bucket!r} does not exist",
                                  hint=f"create it (aws s3 mb s3://{self.bucket}) or fix repository.url") from None
        self._bucket_seen = True

    def _reader(self, key: str, answer: Mapping[str, Any] | None) -> io.BufferedReader:
        return io.BufferedReader(_ResumingReader(self, key, answer), buffer_size=1024 * 1024)

    def open(self, key: str) -> tuple[BinaryIO, ObjectMeta]:
        answer = self._call("GetObject", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + key))
        try:
            meta = self._meta_of(key, answer)
        except BaseException:
            answer["Body"].close()
            raise
        return self._reader(key, answer), meta  # type: ignore[return-value]

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                args["ContinuationToken"] = token
            page = self._call("ListObjectsV2", prefix, lambda args=args: self.client.list_objects_v2(**args))
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix):]
                if not key.endswith(META_SUFFIX):
                    modified = item.get("LastModified")
                    yield ObjectInfo(key=key, size=int(item["Size"]),
                                     modified=modified.timestamp() if modified is not None else None)
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, keys: Iterable[str]) -> None:
        # Sidecars go with their objects; deleting one that does not exist is not an error on S3.
        victims = [name for key in keys for name in (key + META_SUFFIX, key)]
        for start in range(0, len(victims), DELETE_BATCH):
            batch = victims[start:start + DELETE_BATCH]
            answer = self._call("DeleteObjects", batch[0], lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True}))
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise RepositoryError(f"cannot delete {self._url(first.get('Key', '')[len(self.prefix):])}: "
                                      f"{first.get('Code')} {first.get('Message', '')}".rstrip(),
                                      hint="s3:DeleteObject is needed for expiry and cleanup (docs/s3.md)")

    def sweep(self, prefix: str) -> int:
        """Abort multipart uploads left under prefix by killed writers. Returns how many."""
        aborted = 0
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        while True:
            page = self._call("ListMultipartUploads", prefix,
                              lambda args=dict(args): self.client.list_multipart_uploads(**args))
            for upload in page.get("Uploads", []):
                self._abort(upload["Key"][len(self.prefix):], upload["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker")


class _ResumingReader(io.RawIOBase):
    """An object's body; where the connection breaks, a ranged GET continues from the last byte read.

    If-Match pins the object version read first, so a resumed read never mixes two objects.
    """

    def __init__(self, storage: S3Storage, key: str, answer: Mapping[str, Any] | None) -> None:
        self.storage = storage
        self.key = key
        self.position = 0
        self.etag: str | None = answer.get("ETag") if answer else None
        self.body: Any = answer["Body"] if answer else None

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        args: dict[str, Any] = {"Bucket": self.storage.bucket, "Key": self.storage.prefix + self.key}
        if self.position:
            args["Range"] = f"bytes={self.position}-"
        if self.etag:
            args["IfMatch"] = self.etag
        answer = self.storage.client.get_object(**args)
        self.etag = self.etag or answer.get("ETag")
        self.body = answer["Body"]

    def _read_some(self, size: int) -> bytes:
        import botocore.exceptions
        import urllib3.exceptions

        if self.body is None:
            self._reopen()
        try:
            return bytes(self.body.read(size))
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            # A body cut mid-stream (a reset) can surface from urllib3 unwrapped: the same transient
            # fault as botocore's streaming error, so the call resumes with a ranged GET.
            self.body.close()
            self.body = None
            raise botocore.exceptions.ResponseStreamingError(error=exc) from exc
        except BaseException:
            self.body.close()
            self.body = None
            raise

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        chunk = self.storage._call("GetObject", self.key, lambda: self._read_some(want))
        buffer[:len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        super().close()


def _read_up_to(data: BinaryIO, size: int) -> bytes:
    """Exactly size bytes, or fewer only at the end of data (streams may return short reads)."""
    pieces: list[bytes] = []
    have = 0
    while have < size:
        piece = data.read(size - have)
        if not piece:
            break
        pieces.append(piece)
        have += len(piece)
    return b"".join(pieces)


def _to_metadata(meta: ObjectMeta) -> dict[str, str]:
    metadata = {SHA_KEY: meta.sha256, SIZE_KEY: str(meta.size)}
    metadata.update({EXTRA_PREFIX + k.replace("_", "-"): str(v) for k, v in meta.extra.items()})
    return metadata


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    for reason in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "certificate verify failed",
                   "wrong version number", "hostname mismatch"):
        if reason in text:
            return reason.lower().replace("_", " ")
    return type(exc).__name__


def _describe_connection_error(exc: Exception) -> str:
    kind = type(exc).__name__
    if "Timeout" in kind:
        return "the store did not answer in time (timeout)"
    if "Protocol" in kind:
        return "the connection broke during the answer"
    if "Closed" in kind or "Reset" in kind or "Streaming" in kind:
        return "the connection was reset"
    if "IncompleteRead" in kind:
        return "the answer was cut off"
    if "EndpointConnection" in kind:
        return "cannot connect to the endpoint"
    return f"connection failed ({kind})"
