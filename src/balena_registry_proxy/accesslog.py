"""One access-log line per request, with every secret taken out first.

Pure functions, no I/O: the server hands the finished request's facts to ``format_line`` and
writes the result. Authorization headers are never logged at all; query values whose name
suggests a credential (tokens, signatures of pre-signed storage URLs, keys) are masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """The facts of one finished request, secrets already taken out."""

    client: str
    method: str
    path: str
    upstream_path: str | None
    status: int
    bytes: int
    ms: float
    request_id: str | None

    @classmethod
    def of(
        cls,
        *,
        client: str,
        method: str,
        target: str,
        upstream_target: str | None,
        status: int,
        size: int,
        elapsed_ms: float,
        request_id: str | None = None,
    ) -> AccessRecord:
        """A record with query secrets masked and every text made printable."""
        return cls(
            client=printable(client),
            method=printable(method),
            path=printable(redact_target(target)),
            upstream_path=printable(redact_target(upstream_target)) if upstream_target else None,
            status=status,
            bytes=size,
            ms=round(elapsed_ms, 1),
            request_id=request_id,
        )

    def line(self) -> str:
        """The text access-log line."""
        upstream = f" -> {self.upstream_path}" if self.upstream_path else ""
        rid = f" rid={self.request_id}" if self.request_id else ""
        return (
            f'{self.client} "{self.method} {self.path}{upstream}" '
            f"{self.status} {self.bytes} {self.ms:.1f}ms{rid}"
        )

    def fields(self) -> dict[str, object]:
        """The record as structured fields, for JSON logs."""
        return {name: getattr(self, name) for name in self.__slots__}
