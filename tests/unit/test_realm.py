"""Edge mode's realm rewriting and the origin the client used."""

from __future__ import annotations

from balena_registry_proxy.forwarded import effective_origin, parse_trust_proxy
from balena_registry_proxy.realm import (
    challenge_realm,
    challenge_service,
    own_realm,
    replace_realm,
    token_request_url,
)

CHALLENGE = (
    'Bearer realm="https://api.balena-cloud.com/auth/v1/token",'
    'service="registry2.balena-cloud.com",scope="repository:org/app:pull"'
)


def test_realm_is_read_and_replaced_keeping_the_rest() -> None:
    assert challenge_realm(CHALLENGE) == "https://api.balena-cloud.com/auth/v1/token"
    replaced = replace_realm(CHALLENGE, own_realm("https", "device.example"))
    assert replaced == CHALLENGE.replace(
        "https://api.balena-cloud.com/auth/v1/token", "https://device.example/auth/v1/token"
    )


def test_challenges_without_a_url_realm_are_left_alone() -> None:
    assert challenge_realm('Basic realm="registry"') is None
    assert challenge_realm('Bearer service="x"') is None


def test_token_request_url_keeps_the_query_verbatim() -> None:
    query = "account=alice&scope=repository%3Aorg%2Fapp%3Apull&service=registry"
    assert (
        token_request_url("https://api/auth/v1/token", query)
        == f"https://api/auth/v1/token?{query}"
    )
    assert token_request_url("https://api/token?x=1", "a=b") == "https://api/token?x=1&a=b"
    assert token_request_url("https://api/token", "") == "https://api/token"


def test_forwarded_origin_only_from_trusted_peers() -> None:
    trusted = parse_trust_proxy("loopback")
    args = ("http", "10.0.0.5:80", "https", "device.example")
    assert effective_origin("127.0.0.1", *args, trusted) == ("https", "device.example")
    assert effective_origin("203.0.113.9", *args, trusted) == ("http", "10.0.0.5:80")
    assert effective_origin("127.0.0.1", "http", "h:80", "gopher", "bad host/x", trusted) == (
        "http",
        "h:80",
    )


def test_the_service_of_a_challenge() -> None:
    challenge = 'Bearer realm="https://api.example/auth/v1/token",service="registry2.example"'
    assert challenge_service(challenge) == "registry2.example"
    assert challenge_service('Bearer realm="x", Service="s2"') == "s2"
    assert challenge_service('Bearer realm="x"') is None
    assert challenge_service('Bearer service=""') is None


def test_a_plain_http_realm_is_a_realm_too() -> None:
    assert challenge_realm('Bearer realm="http://10.0.0.2/token"') == "http://10.0.0.2/token"
    assert challenge_realm('Bearer realm="ftp://10.0.0.2/token"') is None


def test_only_the_first_realm_of_a_header_is_replaced() -> None:
    # Two challenges in one header line: the Bearer one first, a Basic one after it.
    challenge = 'Bearer realm="https://api.example/token",service="r", Basic realm="registry"'
    assert replace_realm(challenge, "https://proxy/auth/v1/token") == (
        'Bearer realm="https://proxy/auth/v1/token",service="r", Basic realm="registry"'
    )
