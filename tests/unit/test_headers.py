"""Which headers cross the proxy, and where redirects point."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.headers import (
    REDIRECT_STATUSES,
    SECURITY_HEADERS,
    accepts,
    client_response_headers,
    redirect_request_headers,
    rewrite_location,
    storage_response_headers,
    unconditional,
    upstream_request_headers,
    without_body_headers,
)


def test_request_headers_keep_duplicates_and_order() -> None:
    headers = [
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("Host", "proxy"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Range", "bytes=0-1"),
        ("If-Range", '"e"'),
        ("If-None-Match", '"e"'),
        ("Authorization", "Bearer t"),
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Expect", "100-continue"),
        ("X-Request-Id", "client-sent\r\nInjected: 1"),
    ]
    assert upstream_request_headers(headers, "rid-1") == [
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Range", "bytes=0-1"),
        ("If-Range", '"e"'),
        ("If-None-Match", '"e"'),
        ("Authorization", "Bearer t"),
        ("X-Request-Id", "rid-1"),
    ]


def test_response_headers_drop_framing_and_hop_by_hop() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", "10"),
        ("Docker-Content-Digest", "sha256:x"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "X-Secret"),
        ("x-secret", "1"),
        ("Proxy-Authenticate", "Basic"),
        ("WWW-Authenticate", "Bearer realm=x"),
        ("Content-Range", "bytes 0-1/2"),
        ("ETag", '"e"'),
        ("Docker-Distribution-API-Version", "registry/2.0"),
    ]
    assert client_response_headers(headers) == [
        ("Content-Type", "application/json"),
        ("Docker-Content-Digest", "sha256:x"),
        ("WWW-Authenticate", "Bearer realm=x"),
        ("Content-Range", "bytes 0-1/2"),
        ("ETag", '"e"'),
        ("Docker-Distribution-API-Version", "registry/2.0"),
    ]


# RFC 9110 (7.6.1) and RFC 9112: the connection-specific fields, and the proxy-only ones that
# are meant for the next hop alone. Spelled out here, from the RFCs, not from the module.
RFC_HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authenticate",
    "Proxy-Authorization",
]
_HOP_BY_HOP_NAMES = {name.lower() for name in RFC_HOP_BY_HOP}

header_names = st.one_of(
    st.sampled_from(RFC_HOP_BY_HOP).map(lambda n: n.upper()),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
)


@given(st.lists(st.tuples(header_names, st.text(max_size=20))))
def test_no_hop_by_hop_header_ever_crosses(headers: list[tuple[str, str]]) -> None:
    upstream = upstream_request_headers(headers, "rid")
    assert upstream[-1] == ("X-Request-Id", "rid")
    for filtered in (upstream[:-1], client_response_headers(headers)):
        assert not any(name.lower() in _HOP_BY_HOP_NAMES for name, _ in filtered)
        assert all(pair in headers for pair in filtered)


UPSTREAM = "https://registry2.example.com"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v2/x/blobs/sha256:a", "/v2/x/blobs/sha256:a"),
        ("https://registry2.example.com/v2/x/blobs/sha256:a?s=1", "/v2/x/blobs/sha256:a?s=1"),
        ("https://REGISTRY2.example.com/v2/x", "/v2/x"),
        ("https://s3.amazonaws.com/bucket/blob?X-Amz-Signature=1", None),
        ("https://d123.cloudfront.net/blob", None),
        ("http://registry2.example.com/v2/x", None),
        ("https://registry2.example.com:8443/v2/x", None),
        ("//registry2.example.com/v2/x", "/v2/x"),
        ("//evil.example.com/v2/x", None),
    ],
)
def test_rewrite_location(location: str, expected: str | None) -> None:
    assert rewrite_location(location, UPSTREAM) == (expected or location)


OCI = "application/vnd.oci.image.manifest.v1+json"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([OCI], True),
        ([f"{SCHEMA2}, {OCI}"], True),
        ([SCHEMA2, f"{OCI}; q=0.5"], True),
        ([OCI.upper()], True),
        ([f"  {OCI}  "], True),
        ([], False),
        ([SCHEMA2], False),
        (["*/*"], False),
        (["application/*"], False),
        ([OCI + "x"], False),
    ],
)
def test_accepts_names_the_media_type_exactly(lines: list[str], expected: bool) -> None:
    assert accepts(lines, OCI) is expected


_ITEM = st.tuples(
    st.sampled_from([OCI, SCHEMA2, "*/*", "application/*", "application/json"]),
    st.sampled_from(["", ";q=0.5", "; charset=utf-8"]),
    st.sampled_from(["", " ", "  "]),
)


@given(st.lists(st.lists(_ITEM, min_size=1, max_size=4), max_size=4))
def test_accepts_exactly_when_some_line_lists_the_type(
    lines: list[list[tuple[str, str, str]]],
) -> None:
    text = [",".join(f"{pad}{kind}{params}{pad}" for kind, params, pad in line) for line in lines]
    listed = any(kind == SCHEMA2 for line in lines for kind, _, _ in line)
    assert accepts(text, SCHEMA2) is listed


def test_a_body_of_the_proxys_own_drops_what_described_the_upstreams() -> None:
    upstream = [
        ("Content-Type", "text/plain"),
        ("Content-Range", "bytes */167"),
        ("Docker-Content-Digest", "sha256:x"),
        ("ETag", '"x"'),
        ("Docker-Distribution-Api-Version", "registry/2.0"),
    ]
    assert without_body_headers(upstream) == [
        ("Docker-Distribution-Api-Version", "registry/2.0"),
        ("Content-Type", "application/json"),
    ]
    assert without_body_headers(upstream, keep=("content-range",)) == [
        ("Content-Range", "bytes */167"),
        ("Docker-Distribution-Api-Version", "registry/2.0"),
        ("Content-Type", "application/json"),
    ]


@pytest.mark.parametrize("name", RFC_HOP_BY_HOP)
@pytest.mark.parametrize("spelling", [str, str.lower, str.upper])
def test_each_hop_by_hop_header_stops_at_the_proxy_both_ways(
    name: str, spelling: Callable[[str], str]
) -> None:
    headers = [("Accept", "a"), (spelling(name), "v"), ("User-Agent", "u")]
    assert upstream_request_headers(headers, "rid") == [
        ("Accept", "a"),
        ("User-Agent", "u"),
        ("X-Request-Id", "rid"),
    ]
    assert client_response_headers(headers) == [("Accept", "a"), ("User-Agent", "u")]


# What each hop sets itself (framing, Host, the request id) and who the client is (RFC 7239,
# the X-Forwarded-* family): a client's own claims never go upstream.
OWN_TO_EACH_HOP = ["Host", "Content-Length", "Expect", "X-Request-Id", "x-request-id"]
FORWARDING = ["Forwarded", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"]
FORWARDING += ["X-Forwarded-Port", "X-Real-IP", "x-forwarded-for"]


@pytest.mark.parametrize("name", OWN_TO_EACH_HOP + FORWARDING)
def test_what_each_hop_sets_itself_is_not_taken_from_the_client(name: str) -> None:
    forwarding = [("X-Forwarded-For", "203.0.113.9")]
    headers = [(name, "client-claim"), ("Accept", "a")]
    assert upstream_request_headers(headers, "rid", forwarding) == [
        ("Accept", "a"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Request-Id", "rid"),
    ]


@pytest.mark.parametrize(
    "name", ["Docker-Content-Digest", "X-Forwarded-For", "Host", "Expect", "X-Request-Id"]
)
def test_response_headers_other_than_framing_cross_to_the_client(name: str) -> None:
    assert client_response_headers([(name, "v"), ("Content-Length", "3")]) == [(name, "v")]


@pytest.mark.parametrize(
    ("connection", "dropped"),
    [
        ("X-A", {"x-a"}),
        ("x-a, X-B", {"x-a", "x-b"}),
        (" X-A ,, ,X-B ", {"x-a", "x-b"}),
        ("close", set()),
    ],
)
def test_headers_named_in_connection_are_hop_by_hop_too(connection: str, dropped: set[str]) -> None:
    headers = [("X-A", "1"), ("Connection", connection), ("X-B", "2"), ("X-C", "3")]
    expected = [(k, v) for k, v in headers if k.lower() not in dropped | {"connection"}]
    assert client_response_headers(headers) == expected
    assert upstream_request_headers(headers, "rid")[:-1] == expected


def test_a_connection_header_lists_hop_by_hop_names_wherever_it_stands() -> None:
    # The Connection line comes after the header it names, and in two lines.
    headers = [("X-A", "1"), ("X-B", "2"), ("connection", "x-a"), ("CONNECTION", "X-B")]
    assert client_response_headers(headers) == []


@pytest.mark.parametrize("spelling", ["Authorization", "authorization", "AUTHORIZATION"])
def test_a_refused_token_is_left_out_of_the_request_upstream(spelling: str) -> None:
    headers = [("Accept", "a"), (spelling, "Bearer refused"), ("Range", "bytes=0-1")]
    dropped = upstream_request_headers(headers, "rid", drop_authorization=True)
    assert dropped == [("Accept", "a"), ("Range", "bytes=0-1"), ("X-Request-Id", "rid")]
    kept = upstream_request_headers(headers, "rid")
    assert kept == [*headers, ("X-Request-Id", "rid")]


def test_dropping_the_token_still_drops_the_hop_by_hop_headers() -> None:
    headers = [("Host", "proxy"), ("Connection", "close"), ("Authorization", "Basic x")]
    assert upstream_request_headers(headers, "r", drop_authorization=True) == [
        ("X-Request-Id", "r")
    ]


def test_a_redirect_to_storage_carries_no_credentials_or_client_identity() -> None:
    headers = [
        ("Authorization", "Bearer registry-token"),
        ("Accept", "application/octet-stream"),
        ("Cookie", "session=1"),
        ("Accept-Encoding", "gzip"),
        ("X-Request-Id", "rid"),
        ("Range", "bytes=5-"),
        ("If-Range", '"e"'),
        ("X-Forwarded-For", "203.0.113.9"),
        ("If-None-Match", '"e"'),
        ("Proxy-Authorization", "Basic x"),
        ("If-Match", '"f"'),
        ("Host", "registry.example.com"),
        ("User-Agent", "skopeo"),
        ("Accept", "*/*"),
    ]
    assert redirect_request_headers(headers) == [
        ("Accept", "application/octet-stream"),
        ("Accept-Encoding", "gzip"),
        ("Range", "bytes=5-"),
        ("If-Range", '"e"'),
        ("If-None-Match", '"e"'),
        ("If-Match", '"f"'),
        ("User-Agent", "skopeo"),
        ("Accept", "*/*"),
    ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["Authorization", "AUTHORIZATION", "Cookie", "Accept", "RANGE", "X-Amz-Date"]
            ),
            st.text(max_size=5),
        )
    )
)
def test_no_credentials_ever_follow_a_redirect(headers: list[tuple[str, str]]) -> None:
    followed = redirect_request_headers(headers)
    assert all(name.lower() in ("accept", "range") for name, _ in followed)
    assert followed == [(k, v) for k, v in headers if k.lower() in ("accept", "range")]


# The headers that describe a body (its type, encoding, range, digests, validators).
BODY_DESCRIPTION = [
    "Content-Type",
    "Content-Encoding",
    "Content-Range",
    "Content-MD5",
    "Digest",
    "Docker-Content-Digest",
    "ETag",
    "Last-Modified",
]


@pytest.mark.parametrize("name", BODY_DESCRIPTION)
def test_each_header_describing_the_upstream_body_goes_with_it(name: str) -> None:
    headers = [("Docker-Distribution-Api-Version", "registry/2.0"), (name.upper(), "x")]
    assert without_body_headers(headers) == [
        ("Docker-Distribution-Api-Version", "registry/2.0"),
        ("Content-Type", "application/json"),
    ]
    kept = without_body_headers(headers, keep=(name.lower(),))
    assert kept[1] == (name.upper(), "x")


def test_headers_that_do_not_describe_the_body_stay_with_the_proxys_own() -> None:
    headers = [("WWW-Authenticate", "Bearer realm=x"), ("Content-Length", "3"), ("Link", "<x>")]
    assert without_body_headers(headers) == [*headers, ("Content-Type", "application/json")]


@pytest.mark.parametrize(
    ("location", "expected"),
    [("https://registry2.example.com", "/"), ("https://registry2.example.com?x=1", "/?x=1")],
)
def test_a_location_on_the_upstream_without_a_path_points_at_the_proxys_root(
    location: str, expected: str
) -> None:
    assert rewrite_location(location, UPSTREAM) == expected


def test_the_security_headers_are_the_ones_the_readme_promises() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    promise = re.search(r"Every response carries (.*?) and an `X-Request-Id`", readme, re.DOTALL)
    assert promise is not None
    promised = re.findall(r"`([\w-]+):\s+(\w+)`", promise[1])
    assert promised == list(SECURITY_HEADERS)


def test_the_redirects_followed_are_those_of_rfc_9110() -> None:
    # 15.4: 301, 302, 303, 307 and 308 carry a Location to follow; 300 (a choice), 304 (not
    # modified) and 305/306 (deprecated, unused) do not.
    assert sorted(REDIRECT_STATUSES) == [301, 302, 303, 307, 308]


def test_only_the_connection_header_names_hop_by_hop_headers() -> None:
    # Headers sorting before and after "connection" whose values look like header names.
    headers = [("Accept", "x-b"), ("X-A", "x-b"), ("Cache-Control", "accept"), ("X-B", "1")]
    assert client_response_headers(headers) == headers
    assert upstream_request_headers(headers, "rid")[:-1] == headers


def test_a_question_about_access_carries_no_range_or_condition() -> None:
    sent = [
        ("Authorization", "Bearer t"),
        ("Range", "bytes=0-9"),
        ("If-Range", '"x"'),
        ("if-none-match", '"x"'),
        ("If-Match", '"x"'),
        ("If-Modified-Since", "d"),
        ("If-Unmodified-Since", "d"),
        ("Accept", "*/*"),
    ]
    assert unconditional(sent) == [("Authorization", "Bearer t"), ("Accept", "*/*")]


def test_a_storage_hosts_challenge_does_not_reach_the_client() -> None:
    storage = [
        ("Content-Type", "application/xml"),
        ("WWW-Authenticate", 'Bearer realm="https://evil.example/steal"'),
        ("www-authenticate", "Basic"),
    ]
    assert storage_response_headers(storage) == [("Content-Type", "application/xml")]


def test_a_storage_hosts_other_headers_reach_the_client() -> None:
    # Names sorting after WWW-Authenticate too.
    storage = [("X-Amz-Request-Id", "r"), ("WWW-Authenticate", "Basic"), ("Accept-Ranges", "bytes")]
    assert storage_response_headers(storage) == [
        ("X-Amz-Request-Id", "r"),
        ("Accept-Ranges", "bytes"),
    ]
