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


@pytest.mark.parametrize(
    ("setting", "trusted", "untrusted"),
    [
        ("loopback", ["127.0.0.1", "127.255.0.9", "::1"], ["128.0.0.1", "::2", "10.0.0.1"]),
        ("linklocal", ["169.254.1.1", "fe80::1", "febf::1"], ["169.253.1.1", "fec0::1"]),
        (
            "uniquelocal",
            ["10.1.2.3", "172.16.0.1", "172.31.255.1", "192.168.9.9", "fc00::1", "fdff::1"],
            ["172.32.0.1", "192.169.0.1", "11.0.0.1", "fe00::1"],
        ),
        ("10.0.0.1/8", ["10.200.0.1"], ["11.0.0.1"]),
        ("2001:db8::/32", ["2001:db8:1::1"], ["2001:db9::1"]),
    ],
)
def test_each_range_trusts_exactly_its_addresses(
    setting: str, trusted: list[str], untrusted: list[str]
) -> None:
    trust = parse_trust_proxy(setting)
    for peer in trusted:
        assert client_address(peer, ["198.51.100.7"], trust) == "198.51.100.7", peer
    for peer in untrusted:
        assert client_address(peer, ["198.51.100.7"], trust) == peer, peer


@pytest.mark.parametrize(
    "setting",
    ["loopback, 10.0.0.0/8", "10.0.0.0/8, loopback", "loopback,,10.0.0.0/8", " , 10.0.0.0/8, "],
)
def test_every_item_of_a_list_counts_whatever_comes_before_it(setting: str) -> None:
    assert client_address("10.0.0.1", ["198.51.100.7"], parse_trust_proxy(setting)) == (
        "198.51.100.7"
    )


def test_a_peer_that_is_no_address_is_never_trusted() -> None:
    # A Unix socket or a host name as the peer: no range covers it, so it forwards for nobody.
    for setting in ("0.0.0.0/0", "::/0, 0.0.0.0/0"):
        assert client_address("proxy.local", ["198.51.100.7"], parse_trust_proxy(setting)) == (
            "proxy.local"
        )
    assert client_address("proxy.local", ["198.51.100.7"], parse_trust_proxy("true")) == (
        "198.51.100.7"
    )


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("true", TrustProxy(trust_all=True)),
        (" TRUE ", TrustProxy(trust_all=True)),
        ("yes", TrustProxy(trust_all=True)),
        ("false", TrustProxy()),
        ("No", TrustProxy()),
        ("  ", TrustProxy()),
        ("3", TrustProxy(hops=3)),
    ],
)
def test_the_words_and_hop_counts_of_trust_proxy(setting: str, expected: TrustProxy) -> None:
    assert parse_trust_proxy(setting) == expected


@pytest.mark.parametrize(
    ("setting", "item"), [("1, 2", "1"), ("loopback, 10.0.0.0/33", "10.0.0.0/33")]
)
def test_a_bad_item_is_named_in_the_message(setting: str, item: str) -> None:
    expected = f"{item!r} is not true, false, a hop count, an address or a CIDR range"
    with pytest.raises(ValueError, match="is not true") as caught:
        parse_trust_proxy(setting)
    assert str(caught.value) == expected


def test_hops_are_counted_from_the_proxy() -> None:
    # Each trusted hop vouches for the address before it: n hops reach n addresses back.
    lines = ["198.51.100.7, 10.0.0.3, 10.0.0.2"]
    expected = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "198.51.100.7", "198.51.100.7"]
    for hops, client in enumerate(expected):
        assert client_address("10.0.0.1", lines, parse_trust_proxy(str(hops))) == client


@pytest.mark.parametrize(
    ("proto", "host", "expected"),
    [
        ("HTTPS", "uuid.example", ("https", "uuid.example")),
        ("https, http", "a.example, b.example", ("https", "a.example")),
        (" http ", " a.example:8443 ", ("http", "a.example:8443")),
        (None, None, ("http", "own.example")),
        ("", "", ("http", "own.example")),
    ],
)
def test_the_first_forwarded_value_of_a_trusted_peer_counts(
    proto: str | None, host: str | None, expected: tuple[str, str]
) -> None:
    trust = parse_trust_proxy("loopback")
    assert effective_origin("127.0.0.1", "http", "own.example", proto, host, trust) == expected


@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9"])
def test_an_own_host_that_is_no_host_is_never_repeated(peer: str) -> None:
    trust = parse_trust_proxy("loopback")
    origin = effective_origin(peer, "https", 'x", realm="evil', None, "bad host", trust)
    assert origin == ("https", "-")


def test_a_single_trusted_hop_is_the_peer_itself() -> None:
    # TRUST_PROXY=1: the peer is the one hop trusted, so its X-Forwarded-Proto/-Host count.
    trust = parse_trust_proxy("1")
    assert effective_origin("10.0.0.1", "http", "own", "https", "a.example", trust) == (
        "https",
        "a.example",
    )
    assert effective_origin("10.0.0.1", "http", "own", None, None, parse_trust_proxy("0")) == (
        "http",
        "own",
    )


def test_a_trusted_peer_may_say_the_client_used_plain_http() -> None:
    trust = parse_trust_proxy("loopback")
    assert effective_origin("127.0.0.1", "https", "own", "http", None, trust) == ("http", "own")
