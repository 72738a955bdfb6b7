"""Repositories for tests, on either backend, and the S3 endpoint (a real `moto_server` on loopback).

Tests look inside a repository through a RepoHandle: the keys it holds, an object's bytes and
state, and the means to damage it, whatever the backend. pgvault itself is only ever used
through its CLI; these handles read and write the store directly, as an attacker or a failing
disk would.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import boto3
import botocore.config

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
REGION = "us-east-1"
# Credentials come from the standard AWS environment variables, as they would for the aws CLI;
# every subprocess (pgvault, and PostgreSQL running archive_command) inherits them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "pgvault-test-key", "AWS_SECRET_ACCESS_KEY": "pgvault-test-secret-do-not-print",
          "AWS_DEFAULT_REGION": REGION}
_names = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto_server on 127.0.0.1 (started once per test session)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {self.port}")
            time.sleep(0.1)

    def client(self, endpoint: str | None = None) -> Any:
        return boto3.client("s3", endpoint_url=endpoint or self.url, region_name=REGION,
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                            config=botocore.config.Config(retries={"total_max_attempts": 3}))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RepoHandle(Protocol):
    kind: str
    url: str

    def section(self) -> dict[str, Any]:
        """The policy's repository section."""
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys (sidecars and temp files excluded), sorted."""
        ...

    def exists(self, key: str) -> bool: ...

    def read(self, key: str) -> bytes: ...

    def write_raw(self, key: str, data: bytes) -> None:
        """Replace an object's bytes behind pgvault's back, keeping its recorded metadata."""
        ...

    def remove(self, key: str) -> None: ...

    def state(self, key: str) -> tuple[Any, ...]:
        """What "unchanged" compares: bytes, recorded metadata, and the stored version's identity."""
        ...

    def snapshot(self) -> dict[str, str]:
        """Everything stored (sidecars, temp files and unfinished uploads included): name -> digest."""
        ...

    def debris(self, prefix: str = "") -> list[str]:
        """What killed writers leave: temp files, unfinished multipart uploads."""
        ...


def flip_byte(repo: RepoHandle, key: str, offset: int | None = None) -> None:
    data = bytearray(repo.read(key))
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    repo.write_raw(key, bytes(data))


class FileRepo:
    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"file://{path}"

    def section(self) -> dict[str, Any]:
        return {"url": self.url}

    def keys(self, prefix: str = "") -> list[str]:
        if not self.path.is_dir():
            return []
        found = (str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix) and not k.endswith(".meta")
                      and not Path(k).name.startswith(".tmp."))

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def write_raw(self, key: str, data: bytes) -> None:
        target = self.path / key
        st = target.stat()
        target.write_bytes(data)
        os.chown(target, st.st_uid, st.st_gid)

    def remove(self, key: str) -> None:
        (self.path / key).unlink()

    def state(self, key: str) -> tuple[Any, ...]:
        target = self.path / key
        return target.read_bytes(), target.with_name(target.name + ".meta").read_bytes(), target.stat().st_ino

    def snapshot(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        return {str(p.relative_to(self.path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                for p in self.path.rglob("*")}

    def debris(self, prefix: str = "") -> list[str]:
        start = self.path / prefix
        return sorted(str(p.relative_to(self.path)) for p in start.rglob(".tmp.*")) if start.is_dir() else []


class S3Repo:
    """A fresh versioned bucket on moto_server (versions show whether an object was ever rewritten)."""

    kind = "s3"

    def __init__(self, moto: MotoServer, *, endpoint: str | None = None, prefix: str = "repo",
                 bucket: str | None = None, **settings: Any) -> None:
        self.moto = moto
        self.bucket = bucket or f"pgvault-test-{os.getpid()}-{next(_names)}"
        self.prefix = prefix
        self.endpoint = endpoint or moto.url
        self.settings = settings
        self.url = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        self.client = moto.client()
        if bucket is None:
            self.client.create_bucket(Bucket=self.bucket)
            self.client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

    def section(self) -> dict[str, Any]:
        # Small chunks so test backups exercise multipart uploads.
        return {"url": self.url, "s3": {"endpoint_url": self.endpoint, "multipart_chunk_size": "5MiB",
                                        **self.settings}}

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _all(self, prefix: str = "") -> list[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._full(prefix))
        return [item for page in pages for item in page.get("Contents", [])]

    def keys(self, prefix: str = "") -> list[str]:
        cut = len(self._full(""))
        return sorted(item["Key"][cut:] for item in self._all(prefix) if not item["Key"].endswith(".meta"))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except self.client.exceptions.ClientError:
            return False

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read())

    def write_raw(self, key: str, data: bytes) -> None:
        metadata = self.client.head_object(Bucket=self.bucket, Key=self._full(key))["Metadata"]
        self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, Metadata=metadata)

    def remove(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def _versions(self, key: str) -> list[str]:
        answer = self.client.list_object_versions(Bucket=self.bucket, Prefix=self._full(key))
        return [v["VersionId"] for v in answer.get("Versions", []) if v["Key"] == self._full(key)]

    def state(self, key: str) -> tuple[Any, ...]:
        head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        sidecar = self.read(key + ".meta") if self.exists(key + ".meta") else b""
        return self.read(key), head["Metadata"], sidecar, self._versions(key)

    def snapshot(self) -> dict[str, str]:
        cut = len(self._full(""))
        found = {item["Key"][cut:]: item["ETag"] for item in self._all()}
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._full("")).get("Uploads", [])
        found.update({f"upload:{u['Key'][cut:]}:{u['UploadId']}": "upload" for u in uploads})
        return found

    def debris(self, prefix: str = "") -> list[str]:
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._full(prefix)).get("Uploads", [])
        return sorted(u["Key"][len(self._full("")):] for u in uploads)
