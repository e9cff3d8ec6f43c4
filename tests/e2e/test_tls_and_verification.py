"""The proxy serving HTTPS itself and verifying tokens, with skopeo trusting a test CA."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from balena_registry_proxy.sandbox import Sandbox, generate_signing_key

from ..pki import write_test_pki
from .conftest import RunningProxy, Skopeo, proxy_process
from .test_pull import ALICE, REV2, SECRET_PINNED

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure_proxy(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningProxy, Path]]:
    """A proxy on HTTPS that verifies tokens against the sandbox's key; and the CA to trust."""
    directory = tmp_path_factory.mktemp("tls")
    trust, cert, key = write_test_pki(directory)
    token_key = directory / "token-issuer.crt"
    token_key.write_bytes(sandbox.signing_key.certificate_pem)
    env = {
        "REGISTRY_URL": sandbox.registry_url,
        "TLS_CERT": str(cert),
        "TLS_KEY": str(key),
        "TOKEN_PUBLIC_KEY": str(token_key),
        # No TOKEN_AUDIENCE: the proxy takes it from the registry's challenge, whose service
        # is not the host the proxy reaches the registry under (127.0.0.1).
    }
    with proxy_process(env, directory / "proxy.log", cafile=trust / "ca.crt") as running:
        yield running, trust


def test_skopeo_pulls_over_https_trusting_the_test_ca(
    client: Skopeo, sandbox: Sandbox, secure_proxy: tuple[RunningProxy, Path]
) -> None:
    proxy, trust = secure_proxy
    ref = f"docker://{proxy.host}/gh_acme/web/1.2.3"
    result = client.run("inspect", f"--cert-dir={trust}", ref)
    assert result.returncode == 0, result.stderr
    assert sandbox.seed[REV2].digest in result.stdout
    private = client.run(
        "inspect",
        f"--cert-dir={trust}",
        f"--creds={ALICE}",
        f"docker://{proxy.host}/gh_acme/secret",
    )
    assert private.returncode == 0, private.stderr
    assert sandbox.seed[SECRET_PINNED].digest in private.stdout


async def test_a_forged_token_never_reaches_upstream(
    sandbox: Sandbox, secure_proxy: tuple[RunningProxy, Path]
) -> None:
    proxy, trust = secure_proxy
    now = int(time.time())
    entry = {"type": "repository", "name": sandbox.seed[REV2].repository, "actions": ["pull"]}
    forged = generate_signing_key().sign(
        {
            "aud": sandbox.service,
            "exp": now + 600,
            "nbf": now - 10,
            "access": [entry | {"alias": "gh_acme/web/1.2.3"}],
        }
    )
    context = ssl.create_default_context(cafile=str(trust / "ca.crt"))
    url = f"https://{proxy.host}/v2/gh_acme/web/1.2.3/manifests/latest"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {forged}"}, ssl=context) as response,
    ):
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
    # The registry saw no token at all (else it would say invalid_token), and asks for the alias.
    assert "error=" not in challenge
    assert 'scope="repository:gh_acme/web/1.2.3:pull"' in challenge


def test_skopeo_refuses_the_proxy_without_the_ca(
    client: Skopeo, secure_proxy: tuple[RunningProxy, Path]
) -> None:
    proxy, _ = secure_proxy
    result = client.run("inspect", f"docker://{proxy.host}/gh_acme/web/1.2.3")
    assert result.returncode != 0
    assert "certificate" in result.stderr
