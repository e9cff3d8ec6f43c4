"""One access-log line per request, with every secret taken out first.

Pure functions, no I/O: the server hands the finished request's facts to ``format_line`` and
writes the result. Authorization headers are never logged at all; query values are masked
unless their name is known to be harmless (pagination, a token request's scope).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

# Query parameters whose values are shown; every other value is masked. Guessing which names
# carry secrets misses some (jwt=, hdnts=, st=, Policy=): only what is known to be harmless is
# shown. Registry pagination, token requests' service/scope/account, containerd's ns.
SHOWN_QUERY_NAMES = frozenset(
    {"n", "last", "service", "scope", "account", "ns", "digest", "mount", "from", "artifacttype"}
)
MASK = "***"
# A shown value must look like one: a count, a tag, a scope, a host, a digest. Anything else
# (an escaped "access_token=..." smuggled into n, say) is masked too.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:/@,+-]*")


def _plain(value: str) -> bool:
    return _PLAIN_VALUE.fullmatch(unquote_plus(value)) is not None


def printable(text: str) -> str:
    """``text`` with anything but printable ASCII escaped, so no input can forge log lines."""
    if text.isascii() and text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def redact_target(target: str) -> str:
    """The request target with every query value masked but those of ``SHOWN_QUERY_NAMES``.

    A parameter without a value (a bare token, say) is masked whole; ``;`` separates
    parameters as ``&`` does, since some servers read it so.
    """
    path, sep, query = target.partition("?")
    if not sep:
        return path
    items = []
    for item in re.split("[&;]", query):
        name, has_value, value = item.partition("=")
        if not has_value:
            items.append(MASK if item else "")
        elif unquote_plus(name).lower() in SHOWN_QUERY_NAMES and _plain(value):
            items.append(item)
        else:
            items.append(f"{name}={MASK}")
    return f"{path}?{'&'.join(items)}"


ACCESS = "access"
"""The attribute of a log record that carries its ``AccessRecord`` (see ``logs.JsonFormatter``)."""


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
