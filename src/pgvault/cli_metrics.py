"""metrics: the Prometheus metrics command."""

from __future__ import annotations
