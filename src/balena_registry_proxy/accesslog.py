"""One access-log line per request, with every secret taken out first.

Pure functions, no I/O: the server hands the finished request's facts to ``format_line`` and
writes the result. Authorization headers are never logged at all; query values whose name
suggests a credential (tokens, signatures of pre-signed storage URLs, keys) are masked.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote

_SECRET_QUERY_KEY = re.compile(
    r"token|passw|secret|key|signature|credential|auth|session|sig$|code", re.IGNORECASE
)
MASK = "***"


def printable(text: str) -> str:
    """``text`` with anything but printable ASCII escaped, so no input can forge log lines."""
    if text.isascii() and text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def redact_target(target: str) -> str:
    """The request target with the values of secret-looking query parameters masked."""
    path, sep, query = target.partition("?")
    if not sep:
        return path
    items = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        shown = MASK if _SECRET_QUERY_KEY.search(key) else value
        items.append(f"{quote(key, safe='')}={quote(shown, safe=':@/*')}")
    return f"{path}?{'&'.join(items)}"


def format_line(
    *,
    client: str,
    method: str,
    target: str,
    upstream_target: str | None,
    status: int,
    size: int,
    elapsed_ms: float,
) -> str:
    """One line: client, method, path, upstream path if rewritten, status, bytes, ms."""
    upstream = f" -> {redact_target(upstream_target)}" if upstream_target else ""
    return (
        f'{printable(client)} "{printable(method)} {printable(redact_target(target))}{upstream}" '
        f"{status} {size} {elapsed_ms:.1f}ms"
    )
