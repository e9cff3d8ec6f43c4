"""Pulls through the proxy with the real skopeo, against the real registry with token auth."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox

from .conftest import RunningProxy, Skopeo

pytestmark = pytest.mark.e2e

PINNED = "173fde6195e3907bc9fa80315fd862a4"  # gh_acme/web 1.2.3+rev1, older than 1.3.0
REV0, REV2 = "e92ac1ab19ea54ec0528b659edc88952", "e8b6a13ac1443a731f1ad8fe7b6573f6"
NEWEST, DRAFT = "8603676b4b8c6695ca8408eee38775d3", "af34a77a2f6fa8d466e5af21f102047e"
FAILED = "6148afa5e5a269b8262f0be330c81663"
SECRET_PINNED = "63ba1da10a1cd217cd1d0db8b51db6b8"
MULTI, BIG = "df536a8c7e7306f41113f698a6a97911", "99b6b1d3944b1ea6cea6317bd9bdb9c3"
ALICE = "alice:alice-sandbox-api-key-0001"
MALLORY = "mallory:mallory-sandbox-api-key-0003"


# Every way of writing a release in a name (see the README), with the release it must pull.
SELECTORS = [
    ("gh_acme/web", PINNED),
    ("gh_acme/web/latest", PINNED),
    ("gh_acme/web/current", PINNED),
    ("gh_acme/web/default", PINNED),
    ("gh_acme/web/pinned", PINNED),
    ("gh_acme/web/1.2.3", REV2),
    ("gh_acme/web/1.3.0", NEWEST),
    ("gh_acme/web/1.4.0-1700000000000", DRAFT),
    (f"gh_acme/web/{REV0}", REV0),
    (f"gh_acme/web/{NEWEST}:some-ignored-tag", NEWEST),
    ("gh_acme/web/1.2.3:v0.0.1", REV2),
]


@pytest.mark.matrix("skopeo", "pull by every selector form")
@pytest.mark.parametrize(("name", "commit"), SELECTORS)
def test_every_selector_resolves_to_its_release(
    client: Skopeo, sandbox: Sandbox, name: str, commit: str
) -> None:
    document = client.inspect(name)
    assert document["Digest"] == sandbox.seed[commit].digest


def test_pinned_is_not_the_newest(sandbox: Sandbox) -> None:
    assert sandbox.seed[PINNED].digest != sandbox.seed[NEWEST].digest


@pytest.mark.matrix("skopeo", "pull by digest")
def test_manifest_by_digest(client: Skopeo, sandbox: Sandbox) -> None:
    digest = sandbox.seed[REV2].digest
    document = client.inspect(f"gh_acme/web/1.2.3@{digest}", "--no-tags")
    assert document["Digest"] == digest


def test_digest_of_another_release_is_unknown_not_latest(client: Skopeo, sandbox: Sandbox) -> None:
    digest = sandbox.seed[REV0].digest
    result = client.run("inspect", "--tls-verify=false", client.ref(f"gh_acme/web/1.2.3@{digest}"))
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr


@pytest.mark.matrix("skopeo", "copy a release, check its file")
def test_copy_delivers_the_release_file(client: Skopeo, tmp_path: Path) -> None:
    result = client.pull("gh_acme/web/1.2.3", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"commit={REV2}" in _release_text(tmp_path)


@pytest.mark.matrix("skopeo", "index child by digest")
def test_multi_platform_child_by_digest(client: Skopeo, sandbox: Sandbox, tmp_path: Path) -> None:
    seeded = sandbox.seed[MULTI]
    result = client.run(
        "--override-arch",
        "arm64",
        "copy",
        "--src-tls-verify=false",
        client.ref("gh_acme/multi/2.0.0"),
        f"dir:{tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    child = (tmp_path / "manifest.json").read_bytes()
    assert (
        "sha256:" + hashlib.sha256(child).hexdigest()
        == seeded.platform_manifests["linux/arm64"].digest
    )
    assert "linux/arm64" in _release_text(tmp_path)


@pytest.mark.matrix("skopeo", "copy a 64 MiB layer")
def test_big_layer_copy_verifies(client: Skopeo, sandbox: Sandbox, tmp_path: Path) -> None:
    result = client.pull("gh_acme/big", tmp_path)
    assert result.returncode == 0, result.stderr
    sizes = [path.stat().st_size for path in tmp_path.iterdir()]
    assert max(sizes) >= 64 * 1024 * 1024 * 0.9
    for digest in sandbox.seed[BIG].layer_digests:
        data = (tmp_path / digest.split(":")[1]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest.split(":")[1]


@pytest.mark.matrix("skopeo", "private app, with and without credentials")
def test_private_app_needs_a_member_key(client: Skopeo, sandbox: Sandbox) -> None:
    anonymous = client.run("inspect", "--tls-verify=false", client.ref("gh_acme/secret/0.2.0"))
    assert anonymous.returncode != 0
    assert "docker login" in anonymous.stderr
    document = client.inspect("gh_acme/secret/0.2.0", creds=ALICE)
    assert document["Digest"] == sandbox.seed[SECRET_PINNED].digest
    assert client.inspect("gh_acme/secret", creds=ALICE)["Digest"] == document["Digest"]


def test_private_app_refuses_wrong_key_and_non_member(client: Skopeo) -> None:
    ref = client.ref("gh_acme/secret/0.2.0")
    wrong = client.run("inspect", "--tls-verify=false", "--creds=alice:wrong-key", ref)
    assert wrong.returncode != 0
    outsider = client.run("inspect", "--tls-verify=false", f"--creds={MALLORY}", ref)
    assert outsider.returncode != 0
    assert "not found, or you are not allowed to pull it" in outsider.stderr


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("gh_acme/web/9.9.9", "release '9.9.9' of app 'gh_acme/web'"),
        ("gh_acme/web/v1.2.3", "release 'v1.2.3' of app 'gh_acme/web'"),
        (f"gh_acme/web/{FAILED}", f"release '{FAILED}' of app 'gh_acme/web'"),
        ("gh_acme/nope/1.0.0", "release '1.0.0' of app 'gh_acme/nope'"),
    ],
)
def test_unknown_names_fail_with_the_helpful_message(client: Skopeo, name: str, shown: str) -> None:
    result = client.run("inspect", "--tls-verify=false", client.ref(name))
    assert result.returncode != 0
    assert shown in result.stderr
    assert "without a leading 'v'" in result.stderr


def test_no_secret_reaches_the_proxy_log(client: Skopeo, proxy: RunningProxy) -> None:
    client.inspect("gh_acme/secret/0.2.0", creds=ALICE)
    log = proxy.log()
    assert "GET /v2/gh_acme/secret/0.2.0/manifests/latest -> /v2/v2/" in log
    for secret in ("alice-sandbox-api-key-0001", "eyJ", "Bearer ", "Basic "):
        assert secret not in log


def _release_text(directory: Path) -> str:
    """The ``release.txt`` the sandbox put in the image copied to ``directory``."""
    manifest = json.loads((directory / "manifest.json").read_bytes())
    texts = []
    for layer in manifest["layers"]:
        data = (directory / layer["digest"].split(":")[1]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as archive:
            for member in archive.getmembers():
                if member.name.endswith("release.txt"):
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    texts.append(extracted.read().decode())
    return "\n".join(texts)


def test_listing_a_private_apps_tags_without_login_is_a_challenge_to_log_in(
    client: Skopeo,
) -> None:
    name = "gh_acme/secret"
    refused = client.run("list-tags", "--tls-verify=false", client.ref(name))
    assert refused.returncode != 0
    assert "invalid status code 404" not in refused.stderr
    assert "unauthorized" in refused.stderr.lower()
    assert "docker login" in refused.stderr
    listed = client.run("list-tags", "--tls-verify=false", f"--creds={ALICE}", client.ref(name))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["Tags"]
