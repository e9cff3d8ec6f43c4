"""An upstream registry over HTTPS, as balenaCloud's is: TLS to the upstream, verified.

The sandbox's registry speaks plain HTTP on loopback; HAProxy in front of it terminates TLS with
a certificate from a throwaway CA (TCP mode: the bytes inside are the registry's own). The
proxy trusts that CA through ``SSL_CERT_FILE``, which Python's default TLS context reads, the
way an operator adds a private CA; without it, the upstream is refused as unverified.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox import Sandbox
from balena_registry_proxy.sandbox.ports import free_port

from ..conftest import require_binary
from ..pki import write_test_pki
from .conftest import Skopeo, proxy_process
from .test_pull import ALICE, BIG, SECRET_PINNED

pytestmark = pytest.mark.e2e


def _haproxy_config(port: int, pem: Path, backend: str) -> str:
    return f"""\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s

frontend tls
    bind 127.0.0.1:{port} ssl crt {pem}
    default_backend registry

backend registry
    server registry {backend}
"""


def _wait_for_tls(url: str, cafile: Path, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``url`` answers over TLS (the registry's 401 counts)."""
    context = ssl.create_default_context(cafile=str(cafile))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1, context=context)  # noqa: S310 - loopback
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
        else:
            return
    raise RuntimeError(f"{url} did not answer over TLS within 30 s")


@pytest.fixture(scope="module")
def https_upstream(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """``https://127.0.0.1:<port>`` in front of the sandbox registry, and the CA to trust."""
    haproxy = require_binary("haproxy", "haproxy")
    directory = tmp_path_factory.mktemp("https-upstream")
    trust, cert, key = write_test_pki(directory)
    pem = directory / "haproxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(_haproxy_config(port, pem, sandbox.registry_host))
    balancer = subprocess.Popen(
        [haproxy, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"https://127.0.0.1:{port}"
        _wait_for_tls(f"{url}/v2/", trust / "ca.crt", balancer)
        yield url, trust / "ca.crt"
    finally:
        balancer.terminate()
        balancer.wait(30)


def test_pulls_through_a_verified_https_upstream(
    client: Skopeo, sandbox: Sandbox, https_upstream: tuple[str, Path], tmp_path: Path
) -> None:
    url, ca = https_upstream
    env = {"REGISTRY_URL": url, "SSL_CERT_FILE": str(ca)}
    with proxy_process(env, tmp_path / "proxy.log") as proxy:
        with urllib.request.urlopen(f"http://{proxy.host}/ready", timeout=30) as ready:
            assert json.load(ready) == {"upstream": url, "ready": True}
        big = client.pull("gh_acme/big", tmp_path / "big", host=proxy.host)
        assert big.returncode == 0, big.stderr
        for digest in sandbox.seed[BIG].layer_digests:
            assert (tmp_path / "big" / digest.removeprefix("sha256:")).exists()
        private = client.pull(
            "gh_acme/secret/0.2.0", tmp_path / "secret", f"--src-creds={ALICE}", host=proxy.host
        )
        assert private.returncode == 0, private.stderr
        layer = sandbox.seed[SECRET_PINNED].manifest.layer_digests[0]
        assert (tmp_path / "secret" / layer.removeprefix("sha256:")).exists()


def test_an_unverified_https_upstream_is_a_clean_502(
    https_upstream: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = https_upstream
    with proxy_process({"REGISTRY_URL": url}, tmp_path / "proxy.log") as proxy:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{proxy.host}/v2/", timeout=30)
        assert refused.value.code == 502
        assert json.load(refused.value)["errors"][0]["code"] == "UNAVAILABLE"
    assert "Traceback" not in (tmp_path / "proxy.log").read_text()
