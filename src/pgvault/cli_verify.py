"""verify: the integrity command."""

from __future__ import annotations
