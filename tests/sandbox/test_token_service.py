"""The token endpoint, in process, through aiohttp's test client."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse, encode_basic_auth
from cryptography import x509
from pytest_aiohttp import AiohttpClient

from balena_registry_proxy.sandbox.catalog import Catalog
from balena_registry_proxy.sandbox.keys import SigningKey, generate_signing_key
from balena_registry_proxy.sandbox.token_service import (
    TOKEN_PATH,
    TOKEN_REQUESTS,
    TokenIssuer,
    TokenRequestRecord,
    create_token_app,
    requested_scopes,
)

SERVICE = "registry2.test"
ISSUER = "api.test"
ALICE_KEY = "alice-sandbox-api-key-0001"
ALICE = {"Authorization": encode_basic_auth("alice", ALICE_KEY)}
MALLORY = {"Authorization": encode_basic_auth("mallory", "mallory-sandbox-api-key-0003")}
SECRET_REPO_COMMIT = "63ba1da10a1cd217cd1d0db8b51db6b8"


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture
def issuer(default_catalog: Catalog, signing_key: SigningKey) -> TokenIssuer:
    return TokenIssuer(default_catalog, signing_key, issuer=ISSUER, service=SERVICE)


def decode(token: str, signing_key: SigningKey, audience: str = SERVICE) -> dict[str, Any]:
    public_key = x509.load_pem_x509_certificate(signing_key.certificate_pem).public_key()
    claims: dict[str, Any] = jwt.decode(
        token,
        public_key,  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience=audience,
        issuer=ISSUER,
    )
    return claims


async def fetch(
    aiohttp_client: AiohttpClient,
    issuer: TokenIssuer,
    params: list[tuple[str, str]],
    headers: dict[str, str] | None = None,
) -> tuple[ClientResponse, dict[str, Any]]:
    client = await aiohttp_client(create_token_app(issuer))
    response = await client.get(TOKEN_PATH, params=params, headers=headers)
    body: dict[str, Any] = await response.json()
    return response, body


async def access_for(
    aiohttp_client: AiohttpClient,
    issuer: TokenIssuer,
    scope: str,
    headers: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    params = [("service", SERVICE), ("scope", scope)]
    response, body = await fetch(aiohttp_client, issuer, params, headers)
    assert response.status == 200
    access: list[dict[str, Any]] = decode(body["token"], issuer.signing_key)["access"]
    return access


async def test_anonymous_public_pull(aiohttp_client: AiohttpClient, issuer: TokenIssuer) -> None:
    params = [("service", SERVICE), ("scope", "repository:gh_acme/web/1.2.3:pull")]
    response, body = await fetch(aiohttp_client, issuer, params)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert set(body) == {"token"}
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == issuer.signing_key.kid
    claims = decode(body["token"], issuer.signing_key)
    assert claims["sub"] == ""
    assert claims["aud"] == SERVICE  # a string, never a list
    assert claims["exp"] - claims["iat"] == 4 * 3600  # the real API's default
    assert claims["nbf"] == claims["iat"] - 10
    uuid.UUID(claims["jti"])
    image = issuer.catalog.release("e8b6a13ac1443a731f1ad8fe7b6573f6")[1].single_image
    assert image is not None
    assert claims["access"] == [
        {
            "type": "repository",
            "name": image.repository,
            "alias": "gh_acme/web/1.2.3",
            "actions": ["pull"],
        }
    ]


async def test_private_anonymous_gets_no_actions(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer
) -> None:
    access = await access_for(aiohttp_client, issuer, "repository:gh_acme/secret/0.2.0:pull")
    assert access == [{"type": "repository", "name": "gh_acme/secret/0.2.0", "actions": []}]


async def test_member_key_gets_pull(aiohttp_client: AiohttpClient, issuer: TokenIssuer) -> None:
    params = [("service", SERVICE), ("scope", "repository:gh_acme/secret/0.2.0:pull,push")]
    # Any non-empty username works; the key decides who the user is.
    headers = {"Authorization": encode_basic_auth("whoever", ALICE_KEY)}
    response, body = await fetch(aiohttp_client, issuer, params, headers)
    assert response.status == 200
    claims = decode(body["token"], issuer.signing_key)
    assert claims["sub"] == "alice"
    image = issuer.catalog.release(SECRET_REPO_COMMIT)[1].single_image
    assert image is not None
    assert claims["access"] == [
        {
            "type": "repository",
            "name": image.repository,
            "alias": "gh_acme/secret/0.2.0",
            "actions": ["pull"],
        }
    ]


async def test_non_member_key_gets_nothing(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer
) -> None:
    access = await access_for(
        aiohttp_client, issuer, "repository:gh_acme/secret/0.2.0:pull", MALLORY
    )
    assert access == [{"type": "repository", "name": "gh_acme/secret/0.2.0", "actions": []}]


@pytest.mark.parametrize(
    "authorization",
    [
        encode_basic_auth("alice", "not-the-key"),
        encode_basic_auth("", ALICE_KEY),
        encode_basic_auth("alice"),
        "Bearer not-the-key",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon-not-the-key").decode(),
        "Basic " + base64.b64encode(b"\xff:\xfe").decode(),
        "",
    ],
)
async def test_bad_credentials_are_401(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer, authorization: str
) -> None:
    params = [("service", SERVICE), ("scope", "repository:gh_acme/web:pull")]
    response, body = await fetch(aiohttp_client, issuer, params, {"Authorization": authorization})
    assert response.status == 401
    assert [e["code"] for e in body["errors"]] == ["UNAUTHORIZED"]
    assert body["errors"][0]["detail"] is None
    assert "not-the-key" not in str(body)


async def test_login_without_scope(aiohttp_client: AiohttpClient, issuer: TokenIssuer) -> None:
    response, body = await fetch(aiohttp_client, issuer, [("service", SERVICE)], ALICE)
    assert response.status == 200
    claims = decode(body["token"], issuer.signing_key)
    assert claims["sub"] == "alice"
    assert claims["access"] == []


async def test_multiple_scopes_repeated_and_space_separated(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer
) -> None:
    params = [
        ("service", SERVICE),
        ("scope", "repository:gh_acme/web:pull"),
        (
            "scope",
            "repository:gh_acme/multi:pull registry:catalog:* repository:gh_acme/secret:pull",
        ),
        ("account", "alice"),
    ]
    response, body = await fetch(aiohttp_client, issuer, params, ALICE)
    assert response.status == 200
    access = decode(body["token"], issuer.signing_key)["access"]
    assert [entry.get("alias") for entry in access] == [
        "gh_acme/web",
        "gh_acme/multi",
        "gh_acme/secret",
    ]
    assert all(entry["actions"] == ["pull"] for entry in access)


async def test_the_audience_is_the_configured_one_whatever_service_is_asked_for(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer
) -> None:
    # As the balena API: its audience is REGISTRY_TOKEN_AUDIENCE, `service` is ignored.
    _, body = await fetch(aiohttp_client, issuer, [("service", "other.service")])
    assert decode(body["token"], issuer.signing_key)["aud"] == SERVICE
    _, body = await fetch(aiohttp_client, issuer, [])
    assert decode(body["token"], issuer.signing_key)["aud"] == SERVICE


async def test_only_get_is_served(aiohttp_client: AiohttpClient, issuer: TokenIssuer) -> None:
    client = await aiohttp_client(create_token_app(issuer))
    response = await client.post(TOKEN_PATH)
    assert response.status == 405


async def test_requests_are_recorded_without_secrets(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer
) -> None:
    app = create_token_app(issuer)
    client = await aiohttp_client(app)
    await client.get(TOKEN_PATH, params={"scope": "repository:gh_acme/web:pull"}, headers=ALICE)
    wrong = {"Authorization": encode_basic_auth("a", "wrong-key")}
    await client.get(TOKEN_PATH, params={"service": SERVICE}, headers=wrong)
    assert app[TOKEN_REQUESTS] == [
        TokenRequestRecord("alice", ("repository:gh_acme/web:pull",), None, 200),
        TokenRequestRecord(None, (), SERVICE, 401),
    ]


def test_claims_are_pure_given_now(issuer: TokenIssuer) -> None:
    claims = issuer.claims(subject="bob", audience="svc", access=[], now=1_000)
    assert {k: v for k, v in claims.items() if k != "jti"} == {
        "iss": ISSUER,
        "sub": "bob",
        "aud": "svc",
        "exp": 1_000 + 4 * 3600,
        "nbf": 990,
        "iat": 1_000,
        "access": [],
    }


def test_clock_and_expiry_are_configurable(
    default_catalog: Catalog, signing_key: SigningKey
) -> None:
    issuer = TokenIssuer(
        default_catalog,
        signing_key,
        issuer=ISSUER,
        service=SERVICE,
        expiry_seconds=5,
        clock=lambda: 1_000.9,
    )
    token = issuer.issue(user=None, scopes=[])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iat"], claims["exp"]) == (1_000, 1_005)


def test_push_token_grants_push(issuer: TokenIssuer) -> None:
    claims = decode(issuer.push_token(["v2/abc", "v2/def"]), issuer.signing_key)
    assert claims["access"] == [
        {"type": "repository", "name": "v2/abc", "actions": ["pull", "push"]},
        {"type": "repository", "name": "v2/def", "actions": ["pull", "push"]},
    ]


def test_requested_scopes_splits_on_whitespace() -> None:
    assert requested_scopes(["a:b:pull  c:d:pull", "", "e:f:push"]) == [
        "a:b:pull",
        "c:d:pull",
        "e:f:push",
    ]


@pytest.mark.parametrize(
    "name", ["gh_acme/stack/1.0.0/api", "gh_acme/stack/latest/db", "gh_acme/web/1.2.3/main"]
)
async def test_a_service_path_gets_no_actions_even_for_members(
    aiohttp_client: AiohttpClient, issuer: TokenIssuer, name: str
) -> None:
    # The balena API refuses every service component (registry.ts), whoever asks.
    for headers in (None, ALICE):
        access = await access_for(aiohttp_client, issuer, f"repository:{name}:pull", headers)
        assert access == [{"type": "repository", "name": name, "actions": []}]
