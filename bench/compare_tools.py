"""The two tools under comparison, driven the same way, and the S3 endpoint they share.

`Pgvault` and `PgBackRest` each know their own commands: repository set-up, archive_command,
backup, restore (and the restore_command recovery then runs). Every command runs as the postgres
OS user (through runuser when we are root), from /tmp, and the timed ones through
proctree.run_measured. `S3Endpoint` is moto_server on 127.0.0.1 behind a TLS-terminating HAProxy:
pgBackRest speaks S3 only over https, so both tools talk to the same https endpoint, each verifying
the same self-signed certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from benchlib import MOTO_SERVER, PGVAULT, free_port, run, wait_listening
from proctree import Measured, run_measured

from pgvault.config import ArchiveConfig, CompressionConfig, parse_policy
from pgvault.errors import ConfigError
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user

STANZA = "bench"
CLUSTER = "bench"
REGION = "us-east-1"
# Throwaway credentials of the local moto_server; they protect nothing.
S3_KEY, S3_SECRET = "bench-access-key", "bench-secret-key"

# pgBackRest's single compress-level is set per command to the level pgvault uses for that job.
BACKUP_LEVEL = CompressionConfig().level
ARCHIVE_LEVEL = ArchiveConfig().compression_level


def write_private(path: Path, text: str) -> Path:
    """A file for the postgres OS user only (policies and pgBackRest configs hold S3 credentials)."""
    path.write_text(text)
    path.chmod(0o600)
    chown_to_db_user(path)
    return path


def db_user_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    chown_to_db_user(path)
    return path


def tree_bytes(root: Path, *, exclude: str) -> int:
    """Bytes of the files under root, leaving out the subtree named `exclude` (the WAL archive)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == exclude or rel.startswith(exclude + os.sep):
            dirnames[:] = []
            continue
        total += sum(os.lstat(os.path.join(dirpath, name)).st_size for name in filenames)
    return total


# ---- the S3 endpoint -----------------------------------------------------------------------------

def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (as IP and DNS name: Python checks the IP SAN, pgBackRest the names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("127.0.0.1"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.chmod(0o644)  # the postgres user (restore_command, pgBackRest) verifies against it
    return cert_path, key_path


HAPROXY_CONFIG = """\
global
  maxconn 1024
defaults
  mode http
  timeout connect 10s
  timeout client 900s
  timeout server 900s
frontend s3
  bind 127.0.0.1:{tls_port} ssl crt {pem}
  default_backend moto
backend moto
  server moto 127.0.0.1:{moto_port}
"""


class S3Endpoint:
    """moto_server on 127.0.0.1 behind an HAProxy that terminates TLS, for both tools alike.

    pgBackRest reaches S3 over https only. moto_server can serve https itself (--ssl-cert), but its
    web server answers every request with `Connection: close` and then drops the TCP connection
    without a TLS close_notify; pgBackRest 2.45 built with OpenSSL 3 reads such a response to the
    end and fails with "TLS error [1:167772454] unexpected eof while reading". HAProxy keeps the
    client connections alive and closes TLS properly; moto behind it speaks plain http as in the
    tests. Objects live in moto's memory (and its temp files).
    """

    def __init__(self, workdir: Path) -> None:
        if not os.access(MOTO_SERVER, os.X_OK):
            raise RuntimeError(f"{MOTO_SERVER} not found: the S3 backend needs moto[server] in this venv "
                               "(scripts/setup installs the test extras), or run with --backends file")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.access(haproxy, os.X_OK):
            raise RuntimeError("haproxy not found: the S3 comparison needs it to serve moto over TLS "
                               "(apt-get install haproxy), or run with --backends file")
        tls = workdir / "tls"
        tls.mkdir()
        tls.chmod(0o755)
        self.cert, key = _self_signed(tls)
        pem = tls / "haproxy.pem"
        pem.write_bytes(self.cert.read_bytes() + key.read_bytes())
        pem.chmod(0o600)
        self.procs: list[subprocess.Popen[bytes]] = []
        moto_port, self.port = free_port(), free_port()
        self._start([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(moto_port)], moto_port, "moto_server")
        config = tls / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(tls_port=self.port, pem=pem, moto_port=moto_port))
        self._start([haproxy, "-f", str(config), "-db"], self.port, "haproxy")
        self.url = f"https://127.0.0.1:{self.port}"
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.url, region_name=REGION, verify=str(self.cert),
                                   aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)

    def _start(self, cmd: list[str], port: int, what: str) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        try:
            wait_listening(port, proc, what)
        except RuntimeError:
            self.stop()
            raise

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def bytes_under(self, bucket: str, prefix: str, *, exclude: str) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(item["Size"] for page in pages for item in page.get("Contents", [])
                   if not item["Key"].startswith(exclude))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- pgvault ---------------------------------------------------------------------------------------

def policy_accepts(section: str, key: str, value: Any) -> bool:
    """Whether this pgvault's policy knows section.key (a setting being written by others may not exist yet)."""
    base = {"cluster": CLUSTER, "postgres": {"conninfo": "host=127.0.0.1"}, "repository": {"url": "file:///x"}}
    try:
        parse_policy({**base, section: {key: value}}, "probe")
    except ConfigError:
        return False
    return True


@dataclass
class Pgvault:
    name = "pgvault"
    workdir: Path
    backend: str
    instance: LocalInstance
    s3: S3Endpoint | None = None

    def __post_init__(self) -> None:
        if self.backend == "s3":
            assert self.s3 is not None
            self.bucket = self.s3.bucket("bench-pgvault")
            self.repository: dict[str, Any] = {
                "url": f"s3://{self.bucket}/repo",
                "s3": {"endpoint_url": self.s3.url, "region": REGION, "access_key_id": S3_KEY,
                       "secret_access_key": S3_SECRET, "ca_bundle": str(self.s3.cert), "addressing_style": "path"},
            }
        else:
            self.repo_dir = db_user_dir(self.workdir / f"repo-pgvault-{self.backend}")
            self.repository = {"url": f"file://{self.repo_dir}"}
        self.config = self.policy("default")

    def policy(self, variant: str, **sections: dict[str, Any]) -> Path:
        """A policy file: the defaults plus these sections (e.g. archive={'look_ahead': 0})."""
        policy = {"cluster": CLUSTER, "postgres": {"conninfo": self.instance.conninfo()},
                  "repository": self.repository, **sections}
        return write_private(self.workdir / f"pgvault-{self.backend}-{variant}.yaml",
                             yaml.safe_dump(policy, sort_keys=False))

    def cli(self, config: Path, *args: str) -> list[str]:
        return as_db_user([PGVAULT, "--config", str(config), "-q", *args])

    def init(self) -> None:
        run(self.cli(self.config, "init"), what="pgvault init")

    def archive_command(self, config: Path | None = None) -> str:
        return shlex.join([PGVAULT, "--config", str(config or self.config), "wal-push"]) + " %p"

    def backup(self) -> tuple[Measured, dict[str, Any]]:
        measured = run_measured(self.cli(self.config, "backup", "--json"), what="pgvault backup")
        record = json.loads(measured.stdout)
        return measured, {"id": record["id"], "raw_bytes": record["raw_size"], "reported_bytes": record["stored_size"]}

    def repo_bytes(self) -> int:
        """Everything in the repository but the WAL archive."""
        if self.backend == "s3":
            assert self.s3 is not None
            return self.s3.bytes_under(self.bucket, "repo/", exclude=f"repo/{CLUSTER}/wal/")
        return tree_bytes(self.repo_dir, exclude=f"{CLUSTER}/wal")

    def restore(self, dest: Path, *, immediate: bool, config: Path | None = None) -> Measured:
        target = ["--target", "immediate", "--target-action", "promote"] if immediate else []
        return run_measured(self.cli(config or self.config, "restore", "--pgdata", str(dest), "--archive-mode", "off",
                                     *target), what="pgvault restore")


# ---- pgBackRest ------------------------------------------------------------------------------------

def pgbackrest_binary() -> str | None:
    return shutil.which("pgbackrest")


@dataclass
class PgBackRest:
    name = "pgBackRest"
    workdir: Path
    backend: str
    instance: LocalInstance
    s3: S3Endpoint | None = None

    def __post_init__(self) -> None:
        binary = pgbackrest_binary()
        assert binary is not None
        self.binary = binary
        home = db_user_dir(self.workdir / f"pgbackrest-{self.backend}")
        self.spool = db_user_dir(home / "spool")
        settings = {
            "process-max": str(os.cpu_count() or 1),
            "compress-type": "zst",
            "compress-level": str(BACKUP_LEVEL),
            "start-fast": "y",
            "log-path": str(db_user_dir(home / "log")),
            "lock-path": str(db_user_dir(home / "lock")),
            "spool-path": str(self.spool),
        }
        if self.backend == "s3":
            assert self.s3 is not None
            self.bucket = self.s3.bucket("bench-pgbackrest")
            settings |= {
                "repo1-type": "s3", "repo1-path": "/repo", "repo1-s3-bucket": self.bucket,
                "repo1-s3-endpoint": "127.0.0.1", "repo1-storage-port": str(self.s3.port),
                "repo1-s3-region": REGION, "repo1-s3-key": S3_KEY, "repo1-s3-key-secret": S3_SECRET,
                "repo1-s3-uri-style": "path", "repo1-storage-ca-file": str(self.s3.cert),
            }
        else:
            self.repo_dir = db_user_dir(self.workdir / f"repo-pgbackrest-{self.backend}")
            settings["repo1-path"] = str(self.repo_dir)
        text = "[global]\n" + "".join(f"{k}={v}\n" for k, v in settings.items())
        text += f"\n[{STANZA}]\npg1-path={self.instance.pgdata}\npg1-port={self.instance.port}\n"
        self.config = write_private(home / "pgbackrest.conf", text)

    def args(self, *more: str) -> list[str]:
        return [self.binary, f"--config={self.config}", f"--stanza={STANZA}", *more]

    def cli(self, *args: str) -> list[str]:
        # The server has no Unix socket (LocalInstance listens on 127.0.0.1 only) and pgBackRest's
        # pg1-socket-path takes only a directory, so libpq gets the host from PGHOST.
        return as_db_user(["env", "PGHOST=127.0.0.1", *self.args(*args)])

    def init(self) -> None:
        run(self.cli("stanza-create"), what="pgbackrest stanza-create")

    def archive_command(self, *, asynchronous: bool = False) -> str:
        extra = ["--archive-async=y"] if asynchronous else []
        return shlex.join(self.args(f"--compress-level={ARCHIVE_LEVEL}", *extra, "archive-push")) + " %p"

    def restore_command(self, pgdata: Path, *, asynchronous: bool = False) -> str:
        # archive-get checks that it runs in pg1-path, which in the config is the source cluster.
        extra = ["--archive-async=y"] if asynchronous else []
        return shlex.join(self.args(f"--pg1-path={pgdata}", *extra, "archive-get")) + ' %f "%p"'

    def backup(self) -> tuple[Measured, dict[str, Any]]:
        measured = run_measured(self.cli("--type=full", "backup"), what="pgbackrest backup")
        info = json.loads(subprocess.run(self.cli("--output=json", "info"), capture_output=True, text=True,
                                         check=True, cwd="/tmp").stdout)
        last = info[0]["backup"][-1]
        return measured, {"id": last["label"], "raw_bytes": last["info"]["size"],
                          "reported_bytes": last["info"]["repository"]["delta"]}

    def repo_bytes(self) -> int:
        if self.backend == "s3":
            assert self.s3 is not None
            return self.s3.bytes_under(self.bucket, "repo/", exclude="repo/archive/")
        return tree_bytes(self.repo_dir, exclude="archive")

    def clear_get_queue(self) -> None:
        """Segments an earlier asynchronous archive-get left in the spool must not serve a later recovery."""
        shutil.rmtree(self.spool / "archive" / STANZA / "in", ignore_errors=True)

    def restore(self, dest: Path, *, immediate: bool, asynchronous_get: bool = False) -> Measured:
        target = ["--type=immediate", "--target-action=promote"] if immediate else []
        command = self.restore_command(dest, asynchronous=asynchronous_get)
        return run_measured(self.cli(f"--pg1-path={dest}", "--archive-mode=off",
                                     f"--recovery-option=restore_command={command}", *target, "restore"),
                            what="pgbackrest restore")
