"""``balena-registry-proxy sandbox --demo``, the command behind ``make demo``, run for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balena_registry_proxy.sandbox.catalog import default_catalog_path, load_catalog
from balena_registry_proxy.sandbox.demo import Probe, format_table, probes
from balena_registry_proxy.sandbox.ports import free_port

pytestmark = pytest.mark.e2e


def test_demo_pulls_every_selector_then_stops_cleanly_on_ctrl_c(
    registry_binary: Path, skopeo: str, tmp_path: Path
) -> None:
    port = free_port()
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "balena_registry_proxy",
                "sandbox",
                "--demo",
                "--port",
                str(port),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    try:
        deadline = time.monotonic() + 120
        while "Still serving" not in output.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        assert "Still serving" in text
        assert f"proxy (pull through this):  http://127.0.0.1:{port}" in text
        # The banner says which release a bare name pulls, and which never resolve.
        assert re.search(r"gh_acme/web +public +releases: .*1\.2\.3\+rev1 \(pinned\)", text)
        assert "1.5.0 (failed)" in text
        assert re.search(r"gh_acme/web/1\.2\.3 +anonymous +gh_acme/web 1\.2\.3\+rev2", text)
        assert re.search(r"gh_acme/web +anonymous +gh_acme/web 1\.2\.3\+rev1", text)
        assert re.search(r"gh_acme/secret/0\.2\.0 +alice +gh_acme/secret 0\.2\.0", text)
        assert re.search(r"gh_acme/secret/0\.2\.0 +anonymous +refused", text)
        assert re.search(r"gh_acme/web/9\.9\.9 +anonymous +refused", text)
        assert "failed:" not in text
        assert list(tmp_path.glob("balena-sandbox-*")), "the sandbox keeps its data in TMPDIR"
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(60)
    assert returncode == 0, output.read_text()
    assert not list(tmp_path.glob("balena-sandbox-*")), "temporary data must be removed"


def test_probes_cover_every_selector_form_of_the_readme() -> None:
    names = {probe.name for probe in probes(load_catalog(default_catalog_path()))}
    assert {
        "gh_acme/web",
        "gh_acme/web/latest",
        "gh_acme/web/1.2.3",
        "gh_acme/web/1.4.0-1700000000000",
        "gh_acme/web/e92ac1ab19ea54ec0528b659edc88952",
        "gh_acme/web/v1.2.3",
    } <= names
    assert "gh_acme/web/1.5.0" not in names, "failed releases are not offered"


def test_private_apps_are_probed_as_a_member_and_anonymously() -> None:
    found = probes(load_catalog(default_catalog_path()))
    secret = [p for p in found if p.name == "gh_acme/secret/0.2.0"]
    assert {p.user.username if p.user else None for p in secret} == {"alice", None}
    assert Probe("gh_acme/empty") not in found


def test_format_table_aligns_columns() -> None:
    table = format_table([("a/b", "anonymous", "x"), ("a/bbbb/1", "alice", "y")])
    lines = table.splitlines()
    assert lines[0].index("as") == lines[2].index("anonymous") == lines[3].index("alice")
    assert set(lines[1]) == {"-"}
