"""GET /v7/<resource>, in process through aiohttp's test client, as clients see it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import ClientResponse, encode_basic_auth, web
from pytest_aiohttp import AiohttpClient
from yarl import URL

from balena_registry_proxy.sandbox.api import add_api_routes
from balena_registry_proxy.sandbox.catalog import Catalog
from balena_registry_proxy.sandbox.model import Database, build_database

ALICE_KEY = "alice-sandbox-api-key-0001"
SECRET_RELEASES = (
    "/v7/release?$select=commit&$filter=belongs_to__application/any(a:a/slug eq 'gh_acme/secret')"
)
RESEARCH_QUERY = (
    "/v7/release?$filter=belongs_to__application/any(a:a/slug eq 'gh_acme/stack')"
    "&$select=id,commit&$expand=release_image($select=id;$expand=image($select="
    "is_stored_at__image_location,content_hash;$expand=is_a_build_of__service($select=service_name)))"
)


@pytest.fixture(scope="module")
def database(default_catalog: Catalog) -> Database:
    return build_database(default_catalog, "registry2.test")


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, default_catalog: Catalog, database: Database
) -> Any:
    app = web.Application()
    add_api_routes(app, default_catalog, database)
    return await aiohttp_client(app)


async def get(client: Any, target: str, headers: dict[str, str] | None = None) -> ClientResponse:
    """GET ``target`` exactly as written (blanks as %20), the way an HTTP client sends it."""
    response: ClientResponse = await client.get(
        URL(target.replace(" ", "%20"), encoded=True), headers=headers
    )
    return response


async def data(
    client: Any, target: str, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    response = await get(client, target, headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-cache"
    body = await response.json()
    assert set(body) == {"d"}
    rows: list[dict[str, Any]] = body["d"]
    return rows


@pytest.mark.parametrize(
    ("resource", "count"),
    # The default catalog's public apps (8 of 11), with their releases, services and images.
    [
        ("application", 8),
        ("release", 20),
        ("service", 9),
        ("image", 30),
        ("release_image", 30),
        ("image__is_part_of__release", 30),
        ("device_type", 5),
        ("cpu_architecture", 6),
    ],
)
async def test_every_resource_reads_anonymously(client: Any, resource: str, count: int) -> None:
    rows = await data(client, f"/v7/{resource}?$select=id")
    assert len(rows) == count


async def test_the_research_notes_query_answers_nested_arrays(client: Any) -> None:
    rows = await data(client, RESEARCH_QUERY)
    assert len(rows) == 5
    first = rows[0]
    assert set(first) == {"id", "commit", "release_image"}
    services = [
        ri["image"][0]["is_a_build_of__service"][0]["service_name"] for ri in first["release_image"]
    ]
    assert services == ["frontend", "api", "db"]
    image = first["release_image"][0]["image"][0]
    assert image["is_stored_at__image_location"].startswith("registry2.test/v2/")
    assert image["content_hash"].startswith("sha256:")


@pytest.mark.parametrize(
    ("headers", "query", "commits"),
    [
        (None, "", 0),
        ({"Authorization": f"Bearer {ALICE_KEY}"}, "", 2),
        ({"Authorization": f"bearer {ALICE_KEY}"}, "", 2),
        (None, f"&apikey={ALICE_KEY}", 2),
        ({"Authorization": "Bearer mallory-sandbox-api-key-0003"}, "", 0),
        # Not a key: the balena API ignores it and answers as to a guest.
        ({"Authorization": "Bearer not-a-key"}, "", 0),
        ({"Authorization": encode_basic_auth("alice", ALICE_KEY)}, "", 0),
        ({"Authorization": f"Bearer  {ALICE_KEY}"}, "", 0),
    ],
)
async def test_credentials(
    client: Any, headers: dict[str, str] | None, query: str, commits: int
) -> None:
    rows = await data(client, SECRET_RELEASES + query, headers)
    assert len(rows) == commits


async def test_an_unknown_apikey_parameter_is_a_server_error(client: Any) -> None:
    response = await get(client, SECRET_RELEASES + "&apikey=not-a-key")
    assert (response.status, await response.read()) == (500, b"")


async def test_public_data_is_the_same_for_everyone(client: Any) -> None:
    guest = await data(client, RESEARCH_QUERY)
    member = await data(client, RESEARCH_QUERY, {"Authorization": f"Bearer {ALICE_KEY}"})
    assert guest == member


async def test_filters_lambdas_and_ordering(client: Any) -> None:
    rows = await data(
        client,
        "/v7/release?$select=raw_version"
        "&$filter=belongs_to__application/any(a:a/slug eq 'gh_acme/browser-aarch64')"
        " and status eq 'success' and not is_invalidated and is_final eq true"
        "&$orderby=semver_major desc,semver_minor desc,semver_patch desc,revision desc",
    )
    assert [r["raw_version"] for r in rows] == ["2.3.8", "2.3.7"]


async def test_encoded_forms_the_balena_parser_accepts(client: Any) -> None:
    plain = await data(client, "/v7/application?$select=slug&$filter=slug eq 'gh_acme/web'")
    encoded = await data(
        client, "/v7/application?%24select=slug&%24filter=slug+eq+%27gh_acme%2Fweb%27"
    )
    assert plain == encoded == [{"slug": "gh_acme/web"}]


@pytest.mark.parametrize(
    "target",
    [
        "/v7/release?$filter=semver_major gt 0",
        # urlencode() output: the balena API's parser takes no escaped '(' '/' ':'.
        "/v7/release?%24filter=belongs_to__application%2Fany%28a%3Aa%2Fslug+eq+%27x%27%29",
        "/v7/release?$select=id, commit",
        "/v7/release(1)",
        "/v7/application?$expand=organization",
        "/v7/application?$filter=owns__device/any(d:true)",
    ],
)
async def test_outside_the_subset_is_400_with_the_apis_body(client: Any, target: str) -> None:
    response = await get(client, target)
    assert response.status == 400
    assert response.content_type == "application/json"
    sent = target.replace(" ", "%20")
    assert json.loads(await response.text()) == f"Malformed url: '{sent}'"


@pytest.mark.parametrize(
    "target",
    [
        "/v7/release?$select=nope",
        "/v7/release?$select=release_image",
        "/v7/release?$filter=commit eq 1",
        "/v7/release?$filter=commit eq '%zz'",
    ],
)
async def test_untranslatable_queries_are_500_without_a_body(client: Any, target: str) -> None:
    response = await get(client, target)
    assert (response.status, await response.read()) == (500, b"")


async def test_unknown_resource_is_401_without_a_body(client: Any) -> None:
    response = await get(client, "/v7/device?$select=id")
    assert (response.status, await response.read()) == (401, b"")


async def test_only_reads(client: Any) -> None:
    response = await client.post("/v7/release", json={"commit": "x"})
    assert response.status == 405


async def test_the_reason_for_a_refusal_is_logged_not_answered(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    response = await get(client, f"/v7/application?$expand=organization&apikey={ALICE_KEY}")
    assert response.status == 400
    assert "not modelled" not in await response.text()
    (record,) = [r for r in caplog.records if r.name == "balena_registry_proxy.sandbox.api"]
    assert "application.organization is not modelled by the sandbox" in record.getMessage()
    assert ALICE_KEY not in record.getMessage()
