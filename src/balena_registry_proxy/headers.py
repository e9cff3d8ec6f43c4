"""Which headers cross the proxy, in each direction, and how ``Location`` is pointed back.

Pure functions, no I/O. Everything end-to-end is relayed verbatim and in order (skopeo sends
several ``Accept`` lines; dropping one turns OCI manifests into 404s or schema2 into schema1);
hop-by-hop headers (RFC 9110 section 7.6.1) and the ones the proxy frames itself are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from .requestid import HEADER as REQUEST_ID

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Framing and routing belong to each hop: the proxy sets its own Host, never sends a request
# body upstream, and frames response bodies itself.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", REQUEST_ID.lower()}
# Who the client is and how it reached the proxy: the proxy says it itself (see
# ``forwarded.forwarding_headers``); a client's own claims do not cross.
FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
    }
)
_REQUEST_DROP |= FORWARDING
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

# Headers that describe a body; they go when the proxy replaces the body with its own.
_BODY_DESCRIPTION = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-range",
        "content-md5",
        "digest",
        "docker-content-digest",
        "etag",
        "last-modified",
    }
)
JSON_CONTENT_TYPE = "application/json"

SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"))

Headers = Iterable[tuple[str, str]]


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    """Header names listed in ``Connection``, which are hop-by-hop too."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _filter(headers: Headers, drop: frozenset[str]) -> list[tuple[str, str]]:
    # Every request and answer passes here: each name is lowered once.
    items = list(headers)
    names = [k.lower() for k, _ in items]
    if "connection" in names:
        drop = drop | _connection_tokens(items)
    return [item for item, name in zip(items, names, strict=True) if name not in drop]


def upstream_request_headers(
    headers: Headers,
    request_id: str,
    forwarding: Headers = (),
    *,
    drop_authorization: bool = False,
) -> list[tuple[str, str]]:
    """The client's headers to send upstream, in order, duplicates kept, with our request id
    and the proxy's own ``forwarding`` headers in place of any the client sent.

    ``drop_authorization`` leaves out a token the proxy refused, so that upstream answers with
    the challenge that sends the client for a new one.
    """
    drop = _REQUEST_DROP | {"authorization"} if drop_authorization else _REQUEST_DROP
    return [*_filter(headers, drop), *forwarding, (REQUEST_ID, request_id)]


def client_response_headers(headers: Headers) -> list[tuple[str, str]]:
    """Upstream's response headers to relay to the client, in order, duplicates kept."""
    return _filter(headers, _RESPONSE_DROP)


def storage_response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of an answer from a host a redirect led to (blob storage), for a client
    that thinks it talks to the registry: no challenge, whose realm a client would send its
    credentials to."""
    return [(k, v) for k, v in headers if k.lower() != "www-authenticate"]


def without_body_headers(
    headers: list[tuple[str, str]], keep: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """Headers for a JSON body the proxy wrote itself in place of upstream's.

    ``keep`` names (lower case) body headers that still hold, such as a 416's Content-Range.
    """
    drop = _BODY_DESCRIPTION.difference(keep)
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    return [*kept, ("Content-Type", JSON_CONTENT_TYPE)]


# What may follow a blob download to another host (storage): nothing that identifies the
# client to the registry. S3 and CloudFront refuse a request that carries an Authorization.
_REDIRECT_SAFE = frozenset(
    {"accept", "accept-encoding", "range", "if-range", "if-none-match", "if-match", "user-agent"}
)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def redirect_request_headers(headers: Headers) -> list[tuple[str, str]]:
    """The headers of a request to follow a redirect to another host: no credentials."""
    return [(k, v) for k, v in headers if k.lower() in _REDIRECT_SAFE]


# What makes an answer partial or conditional: a question about access must not carry it, or
# the registry answers 206 or 304 instead of saying yes.
_PARTIAL_OR_CONDITIONAL = frozenset(
    {"range", "if-range", "if-none-match", "if-match", "if-modified-since", "if-unmodified-since"}
)


def unconditional(headers: Headers) -> list[tuple[str, str]]:
    """``headers`` without Range or conditions: for asking whether a client may read a blob."""
    return [(k, v) for k, v in headers if k.lower() not in _PARTIAL_OR_CONDITIONAL]


def rewrite_location(location: str, upstream_origin: str) -> str:
    """Point a redirect at the proxy when it points at the upstream registry itself.

    A relative ``Location`` (proxy and upstream share paths) and one on the upstream's own origin
    become a relative path, so the client comes back through the proxy. A redirect to another host
    (blob storage such as S3 or CloudFront) is returned untouched: the client fetches from there.
    """
    if location.startswith("/") and not location.startswith("//"):
        return location
    parts = urlsplit(location)
    target = urlsplit(upstream_origin)
    same_host = parts.netloc.lower() == target.netloc.lower()
    same_scheme = parts.scheme in ("", target.scheme)
    if parts.netloc and same_host and same_scheme:
        path = parts.path or "/"
        return f"{path}?{parts.query}" if parts.query else path
    return location


def accepts(accept_values: Iterable[str], media_type: str) -> bool:
    """Whether the ``Accept`` header lines name ``media_type`` itself.

    Wildcards do not count: the registry decides by exact media types which manifests a client
    understands (an OCI index for a client that did not ask for one is "unknown"), and an
    answer from the cache must be the one the registry would give.
    """
    wanted = media_type.lower()
    for value in accept_values:
        for item in value.split(","):
            if item.split(";", 1)[0].strip().lower() == wanted:
                return True
    return False
