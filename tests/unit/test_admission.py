"""Requests refused before routing: HTTP versions, framing, hosts."""

from __future__ import annotations

import pytest

from balena_registry_proxy.admission import refusal

HOST = [("Host", "proxy.example:8080")]
LIMIT = 3 * 8190


def raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


@pytest.mark.parametrize(
    ("version", "headers"),
    [
        ((1, 1), HOST),
        ((1, 1), [("Host", "[::1]:80")]),
        ((1, 1), [("Host", "10.0.0.1")]),
        ((1, 0), []),
        ((1, 0), [("Content-Length", "0")]),
        ((1, 1), [*HOST, ("Transfer-Encoding", "chunked")]),
        ((1, 1), [*HOST, ("X-Forwarded-Host", "a.example, b.example:443")]),
    ],
)
def test_ordinary_requests_pass(version: tuple[int, int], headers: list[tuple[str, str]]) -> None:
    assert refusal(version, raw(headers), LIMIT) is None


@pytest.mark.parametrize(
    ("version", "headers", "message"),
    [
        ((0, 9), [], "HTTP/0.9"),
        ((1, 0), [("transfer-encoding", "chunked")], "Transfer-Encoding"),
        ((1, 0), [*HOST, ("Transfer-Encoding", "identity")], "Transfer-Encoding"),
        ((1, 1), [], "needs a Host"),
        ((1, 1), [*HOST, ("host", "other.example")], "more than one Host"),
        ((1, 1), [("Host", 'evil", error="x')], "not a host name"),
        ((1, 1), [("Host", "")], "not a host name"),
        ((1, 1), [("Host", "a b")], "not a host name"),
        ((1, 1), [("Host", "a.example/path")], "not a host name"),
        ((1, 1), [*HOST, ("X-Forwarded-Host", "ok.example, <script>")], "X-Forwarded-Host"),
        ((1, 0), [("X-Forwarded-Host", "")], "X-Forwarded-Host"),
    ],
)
def test_refused_requests_get_a_400_that_says_why(
    version: tuple[int, int], headers: list[tuple[str, str]], message: str
) -> None:
    error = refusal(version, raw(headers), LIMIT)
    assert error is not None
    assert error.status == 400
    assert error.code == "UNSUPPORTED"
    assert message in error.message


@pytest.mark.parametrize(
    ("version", "headers", "message"),
    [
        ((0, 9), HOST, "HTTP/0.9 is not supported: send HTTP/1.1"),
        (
            (1, 0),
            [("TRANSFER-ENCODING", "chunked")],
            "Transfer-Encoding is not allowed in an HTTP/1.0 request",
        ),
        ((1, 1), [("HOST", "a.example"), ("Host", "a.example")], "more than one Host header"),
        ((1, 1), [("X-Forwarded-Host", "a.example")], "an HTTP/1.1 request needs a Host header"),
        ((1, 1), [("host", "a_b")], "the Host header is not a host name"),
        (
            (1, 1),
            [*HOST, ("x-forwarded-host", "a.example"), ("X-Forwarded-Host", "b.example, c d")],
            "X-Forwarded-Host is not a list of host names",
        ),
    ],
)
def test_each_refusal_says_exactly_why(
    version: tuple[int, int], headers: list[tuple[str, str]], message: str
) -> None:
    error = refusal(version, raw(headers), LIMIT)
    assert error is not None
    assert (error.status, error.code, error.message) == (400, "UNSUPPORTED", message)


@pytest.mark.parametrize(
    ("version", "headers"),
    [
        ((1, 0), [("Host", "a.example")]),
        ((1, 0), [("X-Forwarded-Host", " a.example , b.example ")]),
        ((1, 1), [("Host", "a.example"), ("Transfer-Encoding", "chunked")]),
        ((1, 1), [("host", "a.example"), ("x-forwarded-host", "b.example:8443")]),
        # Headers sorting after Transfer-Encoding and X-Forwarded-Host, that are neither.
        ((1, 0), [("User-Agent", "curl/8"), ("X-Request-Id", "not a host")]),
        ((1, 1), [*HOST, ("X-Forwarded-Proto", "https"), ("X-Real-IP", "a b")]),
    ],
)
def test_what_http_1_0_and_1_1_may_send(
    version: tuple[int, int], headers: list[tuple[str, str]]
) -> None:
    assert refusal(version, raw(headers), LIMIT) is None


@pytest.mark.parametrize(("version", "status"), [((2, 0), 505), ((3, 0), 505)])
def test_other_http_versions_are_refused(version: tuple[int, int], status: int) -> None:
    error = refusal(version, raw(HOST), LIMIT)
    assert error is not None
    assert (error.status, error.code) == (status, "UNSUPPORTED")
    assert error.message == "only HTTP/1.1 (and 1.0) is spoken here"


def test_a_head_beyond_its_bound_is_431() -> None:
    fits = [*HOST, ("Authorization", "a" * 8000), ("X-Other", "b" * 8000)]
    assert refusal((1, 1), raw(fits), LIMIT) is None
    beyond = [*fits, ("X-More", "c" * 9000)]
    error = refusal((1, 1), raw(beyond), LIMIT)
    assert error is not None
    assert (error.status, error.message) == (431, "request head too large")


def test_a_head_of_exactly_its_bound_passes() -> None:
    # Each line counts its name, its value and four bytes more (': ' and CRLF).
    head = [("Host", "h"), ("X-Fill", "f" * (100 - 9 - 10))]
    assert sum(len(n) + len(v) + 4 for n, v in head) == 100
    assert refusal((1, 1), raw(head), 100) is None
    error = refusal((1, 1), raw(head), 99)
    assert error is not None
    assert (error.status, error.code) == (431, "UNSUPPORTED")


def test_an_http_1_x_beyond_1_1_needs_a_host_as_1_1_does() -> None:
    # RFC 9112, 2.3: a later 1.x minor version is answered as HTTP/1.1.
    error = refusal((1, 2), [], LIMIT)
    assert error is not None
    assert error.message == "an HTTP/1.1 request needs a Host header"
