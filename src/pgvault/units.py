"""Sizes for people: the one formatter every command's text output uses."""

from __future__ import annotations


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
