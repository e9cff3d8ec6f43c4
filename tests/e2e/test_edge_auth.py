"""Edge mode with skopeo: tokens fetched through the proxy, as from a LAN that reaches only it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .conftest import RunningProxy, Skopeo
from .test_pull import ALICE, SECRET_PINNED

pytestmark = pytest.mark.e2e


def test_private_pull_with_tokens_through_the_proxy(
    client: Skopeo, sandbox: Sandbox, edge_proxy: RunningProxy, tmp_path: Path
) -> None:
    before = len(sandbox.token_requests)
    secret = "gh_acme/secret/0.2.0"
    result = client.pull(secret, tmp_path, f"--src-creds={ALICE}", host=edge_proxy.host)
    assert result.returncode == 0, result.stderr
    manifest = (tmp_path / "manifest.json").read_bytes()
    assert f"sha256:{hashlib.sha256(manifest).hexdigest()}" == sandbox.seed[SECRET_PINNED].digest
    # skopeo asked the proxy for its tokens, and the proxy asked the token service.
    assert "GET /auth/v1/token?" in edge_proxy.log()
    assert len(sandbox.token_requests) > before
    assert sandbox.token_requests[-1].username == "alice"
