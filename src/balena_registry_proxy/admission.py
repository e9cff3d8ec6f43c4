"""Requests refused before any route sees them: the wrong HTTP, or a host that cannot be one.

Pure functions, no I/O. The HTTP parser accepts a few shapes a proxy must not: an HTTP/0.9
request line (no version), whose answer would be a bare body; an HTTP/1.0 request with
``Transfer-Encoding``, whose framing RFC 9112 (6.1) says to treat as faulty; and a ``Host`` (or
``X-Forwarded-Host``) that is no host, which the proxy would otherwise reflect into the token
realm it names and into its messages.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import RegistryError, bad_request
from .forwarded import is_host


def refusal(
    version: tuple[int, int], raw_headers: Iterable[tuple[bytes, bytes]], max_head: int
) -> RegistryError | None:
    """The 4xx for a request of HTTP ``version`` with ``raw_headers`` that must not be served.

    ``max_head``: the most the headers may take together. A refused request's connection is
    closed: after it, where the next request starts is not known.
    """
    if version < (1, 0):
        return bad_request("UNSUPPORTED", "HTTP/0.9 is not supported: send HTTP/1.1")
    if version >= (2, 0):
        return RegistryError(505, "UNSUPPORTED", "only HTTP/1.1 (and 1.0) is spoken here")
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers]
    if sum(len(name) + len(value) + 4 for name, value in headers) > max_head:
        return RegistryError(431, "UNSUPPORTED", "request head too large")
    hosts: list[str] = []
    forwarded_hosts: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            hosts.append(value)
        elif lower == "x-forwarded-host":
            forwarded_hosts.append(value)
        elif lower == "transfer-encoding" and version == (1, 0):
            return bad_request(
                "UNSUPPORTED", "Transfer-Encoding is not allowed in an HTTP/1.0 request"
            )
    if len(hosts) > 1:
        return bad_request("UNSUPPORTED", "more than one Host header")
    if not hosts and version >= (1, 1):
        return bad_request("UNSUPPORTED", "an HTTP/1.1 request needs a Host header")
    if hosts and not is_host(hosts[0]):
        return bad_request("UNSUPPORTED", "the Host header is not a host name")
    for line in forwarded_hosts:
        if not all(is_host(part.strip()) for part in line.split(",")):
            return bad_request("UNSUPPORTED", "X-Forwarded-Host is not a list of host names")
    return None
