"""Registry process helpers that need no registry binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from balena_registry_proxy.sandbox.registry import (
    AccessLogEntry,
    RegistryNotInstalledError,
    RegistrySettings,
    find_registry_binary,
    parse_access_log,
    render_config,
)

SETTINGS = RegistrySettings(
    realm="http://127.0.0.1:1234/auth/v1/token",
    service="registry2.test",
    issuer="api.test",
    root_cert_path=Path("/keys/token.crt"),
)


def test_config_uses_token_auth_on_loopback() -> None:
    config = render_config(SETTINGS, storage_dir=Path("/data"), port=5555, http_secret="s")
    assert config["http"] == {"addr": "127.0.0.1:5555", "secret": "s"}
    assert config["auth"] == {
        "token": {
            "realm": "http://127.0.0.1:1234/auth/v1/token",
            "service": "registry2.test",
            "issuer": "api.test",
            "rootcertbundle": "/keys/token.crt",
        }
    }
    assert config["storage"]["filesystem"] == {"rootdirectory": "/data"}
    assert config["storage"]["delete"] == {"enabled": False}


def test_parse_access_log_skips_other_lines() -> None:
    text = (
        '127.0.0.1 - - [26/Nov/2025:18:33:04 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "curl"\n'
        "time=... level=info msg=hello\n"
        '127.0.0.1 - - [26/Nov/2025:18:33:04 +0000] "HEAD /v2/v2/abc/manifests/latest'
        ' HTTP/1.1" 200 0 "" "skopeo"\n'
    )
    assert parse_access_log(text) == [
        AccessLogEntry("GET", "/v2/", 401),
        AccessLogEntry("HEAD", "/v2/v2/abc/manifests/latest", 200),
    ]


def test_missing_binary_error_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(RegistryNotInstalledError) as excinfo:
        find_registry_binary(tmp_path / "docker-registry")
    message = str(excinfo.value)
    assert "apt-get install docker-registry" in message
    assert "\n" not in message
