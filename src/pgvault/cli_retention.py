"""expire and keep: the retention commands."""

from __future__ import annotations
