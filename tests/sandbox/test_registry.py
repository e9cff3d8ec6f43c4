"""Registry process helpers that need no registry binary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox.registry import (
    AccessLogEntry,
    RegistryNotInstalledError,
    RegistrySettings,
    S3Storage,
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


def test_config_names_the_jwks_when_given() -> None:
    settings = dataclasses.replace(SETTINGS, jwks_path=Path("/keys/token.jwks"))
    config = render_config(settings, storage_dir=Path("/data"), port=5555, http_secret="s")
    assert config["auth"]["token"]["jwks"] == "/keys/token.jwks"
    assert config["auth"]["token"]["rootcertbundle"] == "/keys/token.crt"


def test_s3_storage_replaces_the_filesystem_and_keeps_redirects_on() -> None:
    s3 = S3Storage(
        endpoint="http://127.0.0.1:9000",
        bucket="blobs",
        region="us-east-1",
        access_key="AKIAEXAMPLE",
        secret_key="example-secret",
    )
    config = render_config(SETTINGS, storage_dir=Path("/data"), port=5555, http_secret="s", s3=s3)
    storage = config["storage"]
    assert "filesystem" not in storage
    assert storage["s3"] == {
        "accesskey": "AKIAEXAMPLE",
        "secretkey": "example-secret",
        "region": "us-east-1",
        "regionendpoint": "http://127.0.0.1:9000",
        "bucket": "blobs",
        "secure": False,
        "v4auth": True,
    }
    # Blob GETs must be answered with a redirect to the bucket, the registry's default.
    assert "redirect" not in storage
    assert storage["delete"] == {"enabled": False}
    assert config["health"] == {"storagedriver": {"enabled": False}}
    # Everything but the storage driver is the same as with the filesystem.
    plain = render_config(SETTINGS, storage_dir=Path("/data"), port=5555, http_secret="s")
    assert {k: v for k, v in config.items() if k != "storage"} == {
        k: v for k, v in plain.items() if k != "storage"
    }


def test_s3_over_https_is_secure() -> None:
    s3 = S3Storage("https://s3.example", "b", "eu-west-1", "k", "s")
    assert s3.render()["secure"] is True


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
