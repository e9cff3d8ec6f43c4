"""Edge mode's realm rewriting and the origin the client used."""

from __future__ import annotations

import base64
import json

from balena_registry_proxy.forwarded import effective_origin, parse_trust_proxy
from balena_registry_proxy.realm import (
    basic_credentials,
    bearer_challenge,
    challenge_realm,
    challenge_service,
    lifetime_fields,
    login_query,
    own_realm,
    replace_realm,
    scope_query,
    token_of,
    token_request_url,
    with_lifetime,
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


def test_basic_credentials() -> None:
    encoded = base64.b64encode(b"alice:key:with:colons").decode()
    assert basic_credentials(f"Basic {encoded}") == ("alice", "key:with:colons")
    assert basic_credentials(f"basic  {encoded} ") == ("alice", "key:with:colons")
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials(None) is None
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials("Basic " + base64.b64encode(b"no colon").decode()) is None
    assert basic_credentials("Basic " + base64.b64encode(b"\xff:\xfe").decode()) is None


def test_login_query_keeps_all_but_balena_names() -> None:
    query = (
        "account=alice&service=registry2.example&scope=repository:gh_acme/web:pull"
        "&scope=repository:v2/abc:pull&client_id=docker"
    )
    assert login_query(query) == (
        "account=alice&service=registry2.example&scope=repository:v2/abc:pull&client_id=docker"
    )
    assert login_query("") == ""


def test_scope_query() -> None:
    assert scope_query("registry2.example", ["v2/a", "v2/b"]) == (
        "service=registry2.example&scope=repository:v2/a:pull&scope=repository:v2/b:pull"
    )
    assert scope_query(None, ["v2/a"]) == "scope=repository:v2/a:pull"


def test_bearer_challenge() -> None:
    challenge = bearer_challenge("https://p.example/auth/v1/token", "reg", "o/a", "invalid_token")
    assert challenge == (
        'Bearer realm="https://p.example/auth/v1/token",service="reg",'
        'scope="repository:o/a:pull",error="invalid_token"'
    )
    assert challenge_realm(challenge) == "https://p.example/auth/v1/token"
    assert challenge_service(challenge) == "reg"


def test_token_of() -> None:
    assert token_of(b'{"token":"a"}') == "a"
    assert token_of(b'{"access_token":"b"}') == "b"
    assert token_of(b'{"token":""}') is None
    assert token_of(b'{"token":3}') is None
    assert token_of(b"[]") is None
    assert token_of(b"not json") is None


def test_lifetimes_are_added_from_the_claims() -> None:
    added = json.loads(
        with_lifetime(b'{"token":"t"}', {"iat": 1_800_000_000, "exp": 1_800_014_400}, 0)
    )
    assert added == {"token": "t", "expires_in": 14400 - 60, "issued_at": "2027-01-15T08:00:00Z"}
    # Without iat, now; a short token is still kept a minute.
    short = json.loads(with_lifetime(b'{"token":"t"}', {"exp": 1_800_000_030}, 1_800_000_000))
    assert short["expires_in"] == 60
    kept = b'{"token":"t","expires_in":300}'
    assert with_lifetime(kept, {"exp": 1}, 0) == kept
    assert with_lifetime(b'{"token":"t"}', {}, 0) == b'{"token":"t"}'
    assert with_lifetime(b'{"token":"t"}', None, 0) == b'{"token":"t"}'
    assert with_lifetime(b"oops", {"exp": 5}, 0) == b"oops"


def test_lifetime_fields() -> None:
    assert lifetime_fields(0, 3600) == {"expires_in": 3540, "issued_at": "1970-01-01T00:00:00Z"}


def test_basic_credentials_must_be_base64_through_and_through() -> None:
    encoded = base64.b64encode(b"alice:key").decode()
    assert basic_credentials(f"Basic {encoded}!") is None
    assert basic_credentials(f"Basic {encoded[:4]} {encoded[4:]}") is None
    assert basic_credentials(f"  BASIC {encoded}") == ("alice", "key")


def test_login_query_keeps_blank_values_and_drops_other_scopes_of_balena_names() -> None:
    query = (
        "account=&scope=registry:catalog:*&scope=repository:v2/abc:pull,push"
        "&scope=repository:registry.example:5000/gh_acme/web:pull"
        "&scope=repository:registry.example:5000/v2/abc:pull"
    )
    assert login_query(query) == "account=&scope=repository:v2/abc:pull%2Cpush"


def test_a_bare_challenge_names_only_the_realm() -> None:
    realm = "https://p.example/auth/v1/token"
    assert bearer_challenge(realm, None, None, None) == f'Bearer realm="{realm}"'
    assert bearer_challenge(realm, "", "o/a", "") == (
        f'Bearer realm="{realm}",scope="repository:o/a:pull"'
    )


def test_an_empty_token_gives_way_to_the_access_token() -> None:
    assert token_of(b'{"token":"","access_token":"b"}') == "b"
    assert token_of(b'{"access_token":""}') is None


def test_only_the_basic_scheme_gives_credentials() -> None:
    # Schemes sorting before and after "basic", with a token that would decode as Basic.
    encoded = base64.b64encode(b"alice:key").decode()
    assert basic_credentials(f"Apikey {encoded}") is None
    assert basic_credentials(f"Bearer {encoded}") is None


def test_only_repository_scopes_of_real_names_reach_the_realm() -> None:
    # Kinds sorting before and after "repository", naming a real repository.
    assert login_query("scope=registry:v2/abc:pull&scope=source:v2/abc:pull") == ""
