"""Object keys of repository format v1. The one place that knows where things live."""

from __future__ import annotations

FORMAT_VERSION = 1


class Layout:
    """Keys for one cluster's area of a repository: `<cluster>/...`."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    @property
    def cluster_json(self) -> str:
        return f"{self.cluster}/cluster.json"

    @property
    def wal_prefix(self) -> str:
        return f"{self.cluster}/wal/"

    def wal_key(self, name: str) -> str:
        """Segments, .partial and .backup files sit in a directory per timeline+log; history beside it."""
        if name.endswith(".history"):
            return f"{self.cluster}/wal/{name}"
        return f"{self.cluster}/wal/{name[:16]}/{name}.zst"

    @staticmethod
    def wal_name(key: str) -> str:
        """The WAL file name an object key holds."""
        return key.rsplit("/", 1)[-1].removesuffix(".zst")

    @property
    def backups_prefix(self) -> str:
        return f"{self.cluster}/backups/"

    def backup_prefix(self, backup_id: str) -> str:
        return f"{self.cluster}/backups/{backup_id}/"

    def part_key(self, backup_id: str, index: int) -> str:
        return f"{self.cluster}/backups/{backup_id}/part-{index:05d}.tar.zst"

    def manifest_key(self, backup_id: str) -> str:
        return f"{self.cluster}/backups/{backup_id}/backup_manifest.zst"

    def sentinel_key(self, backup_id: str) -> str:
        return f"{self.cluster}/backups/{backup_id}/backup.json"

    def pin_key(self, backup_id: str) -> str:
        """Present while `pgvault keep ID` protects the backup from expiry."""
        return f"{self.cluster}/pins/{backup_id}.json"

    @property
    def pins_prefix(self) -> str:
        return f"{self.cluster}/pins/"

    def verify_report_key(self, report_id: str) -> str:
        return f"{self.cluster}/verify/{report_id}.json"

    @property
    def verify_prefix(self) -> str:
        return f"{self.cluster}/verify/"

    def drill_report_key(self, report_id: str) -> str:
        return f"{self.cluster}/drills/{report_id}.json"

    @property
    def drills_prefix(self) -> str:
        return f"{self.cluster}/drills/"

    @property
    def probe_key(self) -> str:
        return f"{self.cluster}/.pgvault-write-probe"
