"""Request ids, metrics, readiness, JSON logs and token verification."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from balena_registry_proxy.config import Settings
from balena_registry_proxy.sandbox import generate_signing_key
from balena_registry_proxy.sandbox.ports import free_port

from ..conftest import until_serving
from ..tokens import alias_entry, bearer, make_token
from .conftest import ALIAS, MANIFEST, REAL, FakeRegistry, serve_proxy
from .test_cli import cli_process, run_cli

Client = TestClient[web.Request, web.Application]
TOKEN = make_token(alias_entry(ALIAS, REAL))


async def test_request_id_is_kept_passed_upstream_returned_and_logged(
    proxy: Client, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balena_registry_proxy.access")
    headers = {**bearer(TOKEN), "X-Request-Id": "build-42.step-7"}
    response = await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=headers)
    await response.read()
    assert response.headers["X-Request-Id"] == "build-42.step-7"
    assert registry.seen[-1].headers.getall("X-Request-Id") == ["build-42.step-7"]
    await asyncio.sleep(0.05)
    assert caplog.records[-1].getMessage().endswith(" rid=build-42.step-7")


async def test_request_id_is_made_when_missing_or_odd(
    proxy: Client, registry: FakeRegistry
) -> None:
    for sent in ({}, {"X-Request-Id": "has space"}):
        response = await proxy.get("/v2/", headers=sent)
        made = response.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert registry.seen[-1].headers["X-Request-Id"] == made
    refused = await proxy.delete("/v2/x/manifests/latest")
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["X-Request-Id"])


def sample(page: str, series: str) -> float:
    """The value of one series line (name and labels exactly as exposed) on a metrics page."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", page, re.MULTILINE)
    assert match is not None, f"{series} not in metrics"
    return float(match.group(1))


async def test_metrics_count_requests_routes_bytes_rewrites_and_latency(
    proxy: Client, registry: FakeRegistry
) -> None:
    await (await proxy.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(TOKEN))).read()
    await (
        await proxy.get(f"/v2/{ALIAS}/blobs/{registry.blob_digest}", headers=bearer(TOKEN))
    ).read()
    await proxy.put(f"/v2/{ALIAS}/manifests/latest")
    await proxy.get("/v2/")
    response = await proxy.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    page = await response.text()
    requests = "registry_proxy_requests_total"
    assert sample(page, f'{requests}{{method="GET",route="manifest",status="2xx"}}') == 1
    assert sample(page, f'{requests}{{method="GET",route="blob",status="2xx"}}') == 1
    assert sample(page, f'{requests}{{method="other",route="other",status="4xx"}}') == 1
    assert sample(page, f'{requests}{{method="GET",route="other",status="4xx"}}') == 1
    blob_bytes = sample(page, 'registry_proxy_response_body_bytes_total{route="blob"}')
    assert blob_bytes == registry.blob_path.stat().st_size
    manifest_bytes = sample(page, 'registry_proxy_response_body_bytes_total{route="manifest"}')
    assert manifest_bytes == len(MANIFEST)
    assert sample(page, 'registry_proxy_alias_lookups_total{outcome="aliased"}') == 2
    assert sample(page, 'registry_proxy_alias_lookups_total{outcome="passthrough"}') == 1
    latency = 'registry_proxy_upstream_response_seconds_count{route="manifest"}'
    assert sample(page, latency) == 1
    assert sample(page, "registry_proxy_in_flight_requests") == 1  # this very request


async def test_metrics_count_upstream_errors(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    settings = Settings(registry_url=f"http://127.0.0.1:{free_port()}")
    client = await serve_proxy(settings, aiohttp_client)
    assert (await client.get("/v2/")).status == 502
    page = await (await client.get("/metrics")).text()
    assert sample(page, 'registry_proxy_upstream_errors_total{kind="unreachable"}') == 1


async def test_ready_while_upstream_answers(proxy: Client, registry: FakeRegistry) -> None:
    response = await proxy.get("/ready")
    assert response.status == 200
    assert (await response.json())["ready"] is True
    assert registry.seen[-1].path_qs == "/v2/"


async def test_not_ready_when_upstream_answers_5xx(
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/{tail:.*}", down)
    upstream = await aiohttp_server(app)
    settings = Settings(registry_url=str(upstream.make_url("")).rstrip("/"))
    client = await serve_proxy(settings, aiohttp_client)
    assert (await client.get("/v2/")).status == 503
    assert (await client.get("/ready")).status == 503


async def test_not_ready_when_upstream_is_unreachable(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    settings = Settings(registry_url=f"http://127.0.0.1:{free_port()}")
    client = await serve_proxy(settings, aiohttp_client)
    response = await client.get("/ready")
    assert response.status == 503
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert (await client.get("/ping")).status == 200


async def test_json_logs_carry_access_fields_and_no_secrets() -> None:
    port = free_port()
    async with cli_process(
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--registry-url",
        f"http://127.0.0.1:{free_port()}",
        "--log-format",
        "json",
    ) as process:
        async with aiohttp.ClientSession() as session:
            await until_serving(f"http://127.0.0.1:{port}")
            headers = {**bearer(TOKEN), "X-Request-Id": "json-1"}
            url = f"http://127.0.0.1:{port}/v2/{ALIAS}/manifests/latest?token=hunter2"
            await (await session.get(url, headers=headers)).read()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    records = [json.loads(line) for line in stderr.decode().splitlines()]
    access = [r for r in records if r.get("request_id") == "json-1"]
    assert len(access) == 1
    assert access[0]["status"] == 502
    assert access[0]["path"] == f"/v2/{ALIAS}/manifests/latest?token=***"
    assert access[0]["upstream_path"] == f"/v2/{REAL}/manifests/latest?token=***"
    assert all(record["level"] in {"info", "warning"} for record in records)
    for record in records:
        # RFC 3339, UTC, milliseconds.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    # The access line's duration is measured, not the event loop's whole milliseconds.
    assert access[0]["ms"] > 0
    assert "hunter2" not in stderr.decode()
    assert TOKEN not in stderr.decode()


async def test_verified_tokens_are_used_and_refused_ones_never_sent_upstream(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> None:
    key = generate_signing_key()
    (tmp_path / "cert.pem").write_bytes(key.certificate_pem)
    upstream = await aiohttp_server(registry.app())
    settings = Settings(
        registry_url=str(upstream.make_url("")).rstrip("/"),
        token_public_key=str(tmp_path / "cert.pem"),
        token_audience="registry.test",
    )
    client = await serve_proxy(settings, aiohttp_client)
    now = int(time.time())
    good = key.sign(
        {
            "aud": "registry.test",
            "exp": now + 600,
            "nbf": now - 10,
            "access": [alias_entry(ALIAS, REAL)],
        }
    )
    response = await client.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(good))
    assert response.status == 200
    assert registry.seen[-1].path_qs == f"/v2/{REAL}/manifests/latest"

    response = await client.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(TOKEN))
    assert registry.seen[-1].path_qs == f"/v2/{ALIAS}/manifests/latest"
    assert "Authorization" not in registry.seen[-1].headers
    page = await (await client.get("/metrics")).text()
    assert sample(page, 'registry_proxy_alias_lookups_total{outcome="refused"}') == 1


async def test_unreadable_token_key_stops_start_up_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("not a key")
    for path, expected in (
        (tmp_path / "missing.pem", "No such file"),
        (tmp_path / "key.pem", "not a PEM"),
    ):
        process = await run_cli("--port", str(free_port()), "--token-public-key", str(path))
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 2
        lines = stderr.decode().strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("balena-registry-proxy: TOKEN_PUBLIC_KEY (--token-public-key)")
        assert expected in lines[0]


@pytest.mark.parametrize(
    ("registry2_host", "audience", "accepted"),
    [
        # Unset: what the registry names as its service in its challenge.
        (None, "registry.test", True),
        (None, "127.0.0.1", False),
        # REGISTRY2_HOST set: the name balenaCloud's API issues tokens for.
        ("registry2.example.com", "registry2.example.com", True),
        ("registry2.example.com", "registry.test", False),
    ],
)
async def test_the_audience_of_verified_tokens_is_the_registrys_own_name(
    registry: FakeRegistry,
    aiohttp_server: Callable[..., Awaitable[Any]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    tmp_path: Path,
    registry2_host: str | None,
    audience: str,
    accepted: bool,
) -> None:
    key = generate_signing_key()
    (tmp_path / "cert.pem").write_bytes(key.certificate_pem)
    upstream = await aiohttp_server(registry.app())
    settings = Settings(
        registry_url=str(upstream.make_url("")).rstrip("/"),
        registry2_host=registry2_host,
        token_public_key=str(tmp_path / "cert.pem"),
    )
    client = await serve_proxy(settings, aiohttp_client)
    now = int(time.time())
    claims = {"aud": audience, "exp": now + 600, "access": [alias_entry(ALIAS, REAL)]}
    response = await client.get(f"/v2/{ALIAS}/manifests/latest", headers=bearer(key.sign(claims)))
    assert (response.status == 200) is accepted
    assert (registry.seen[-1].path_qs == f"/v2/{REAL}/manifests/latest") is accepted
