"""TRUST_PROXY: who the client is behind reverse proxies."""

from __future__ import annotations

import pytest

from balena_registry_proxy.forwarded import (
    TrustProxy,
    client_address,
    effective_origin,
    forwarding_headers,
    is_host,
    parse_trust_proxy,
)

XFF = "203.0.113.9, 10.0.0.2, 10.0.0.1"


@pytest.mark.parametrize(
    ("setting", "peer", "forwarded", "expected"),
    [
        ("false", "10.0.0.1", XFF, "10.0.0.1"),
        ("", "10.0.0.1", XFF, "10.0.0.1"),
        ("true", "10.0.0.1", XFF, "203.0.113.9"),
        ("true", "10.0.0.1", None, "10.0.0.1"),
        ("1", "10.0.0.5", XFF, "10.0.0.1"),
        ("2", "10.0.0.5", XFF, "10.0.0.2"),
        ("9", "10.0.0.5", XFF, "203.0.113.9"),
        ("0", "10.0.0.5", XFF, "10.0.0.5"),
        ("10.0.0.0/8", "10.0.0.5", XFF, "203.0.113.9"),
        ("10.0.0.5, 10.0.0.1", "10.0.0.5", XFF, "10.0.0.2"),
        ("loopback", "127.0.0.1", "198.51.100.7", "198.51.100.7"),
        ("loopback", "10.0.0.1", "198.51.100.7", "10.0.0.1"),
        ("uniquelocal", "192.168.1.2", "garbage, 10.1.1.1", "10.1.1.1"),
        ("true", "10.0.0.1", '1.2.3.4" "GET /forged, 10.0.0.2', "10.0.0.2"),
        ("::1", "::1", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address(setting: str, peer: str, forwarded: str | None, expected: str) -> None:
    lines = [forwarded] if forwarded else []
    assert client_address(peer, lines, parse_trust_proxy(setting)) == expected


def test_every_forwarded_for_line_counts_in_order() -> None:
    lines = ["203.0.113.9", "10.0.0.2"]
    assert client_address("10.0.0.1", lines, parse_trust_proxy("true")) == "203.0.113.9"
    assert client_address("10.0.0.1", lines, parse_trust_proxy("1")) == "10.0.0.2"


def test_unknown_peer() -> None:
    assert client_address(None, [], TrustProxy()) == "-"


@pytest.mark.parametrize("setting", ["maybe", "10.0.0.0/33", "1.2.3.4, nope", "-1", "1, 2"])
def test_bad_settings_are_refused_with_the_offending_part(setting: str) -> None:
    with pytest.raises(ValueError, match="is not true, false"):
        parse_trust_proxy(setting)


def test_only_believed_addresses_are_forwarded() -> None:
    untrusted = forwarding_headers("10.0.0.1", [XFF], "http", "p.test", parse_trust_proxy("false"))
    assert untrusted == [
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "p.test"),
    ]
    one_hop = forwarding_headers("10.0.0.5", [XFF], "https", "h", parse_trust_proxy("1"))
    assert one_hop[0] == ("X-Forwarded-For", "10.0.0.1, 10.0.0.5")
    everyone = forwarding_headers("10.0.0.1", [XFF], "https", "h", parse_trust_proxy("true"))
    assert everyone[0] == ("X-Forwarded-For", "203.0.113.9, 10.0.0.2, 10.0.0.1, 10.0.0.1")
    forged = forwarding_headers("10.0.0.1", ["1.2.3.4, x"], "http", "h", parse_trust_proxy("true"))
    assert forged[0] == ("X-Forwarded-For", "10.0.0.1")


@pytest.mark.parametrize(
    ("peer", "proto", "host", "expected"),
    [
        ("127.0.0.1", "https", "uuid.example", ("https", "uuid.example")),
        ("127.0.0.1", "ftp", "bad host", ("http", "own.example")),
        ("10.9.9.9", "https", "uuid.example", ("http", "own.example")),
        (None, "https", "uuid.example", ("http", "own.example")),
    ],
)
def test_effective_origin_believes_only_trusted_peers(
    peer: str | None, proto: str, host: str, expected: tuple[str, str]
) -> None:
    trust = parse_trust_proxy("loopback")
    assert effective_origin(peer, "http", "own.example", proto, host, trust) == expected


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("a.example", True),
        ("a.example:8080", True),
        ("[2001:db8::1]:443", True),
        ("10.0.0.1", True),
        ('a", realm="x', False),
        ("a b", False),
        ("", False),
        ("a.example:123456", False),
        ("user@a.example", False),
    ],
)
def test_host_grammar(text: str, valid: bool) -> None:
    assert is_host(text) is valid
