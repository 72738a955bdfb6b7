"""drill: the DR drill command."""

from __future__ import annotations
