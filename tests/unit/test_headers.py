"""Which headers cross the proxy, and where redirects point."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.headers import (
    HOP_BY_HOP,
    accepts,
    client_response_headers,
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


header_names = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP)).map(lambda n: n.upper()),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
)


@given(st.lists(st.tuples(header_names, st.text(max_size=20))))
def test_no_hop_by_hop_header_ever_crosses(headers: list[tuple[str, str]]) -> None:
    upstream = upstream_request_headers(headers, "rid")
    assert upstream[-1] == ("X-Request-Id", "rid")
    for filtered in (upstream[:-1], client_response_headers(headers)):
        assert not any(name.lower() in HOP_BY_HOP for name, _ in filtered)
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
