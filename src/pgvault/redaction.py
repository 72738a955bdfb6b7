"""Keeping secrets out of output (guarantee 10): passwords in conninfo strings and URIs."""

from __future__ import annotations

import re

_KEYWORD_SECRET = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_SECRET = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)([^@\s]+)(@)")


def redact(text: str) -> str:
    """Replace every password in text with ***."""
    text = _KEYWORD_SECRET.sub(r"\1***", text)
    return _URI_SECRET.sub(r"\1***\3", text)
