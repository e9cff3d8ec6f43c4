"""bench/shared.py's reading of the upstream registry's access log and its configurations, and
the shared-cache table of the committed run (docs/benchmark/shared.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench import report, shared

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmark"
LAYER = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def line(method: str, path: str, status: int, size: str) -> str:
    return (
        f'127.0.0.1 - - [03/Dec/2026:11:28:11 +0000] "{method} {path} HTTP/1.1" {status} {size} '
        '"" "skopeo/1.9.3"'
    )


def test_only_blob_gets_that_succeeded_count_with_the_bytes_sent() -> None:
    blobs = "/v2/v2/0123/blobs/"
    text = "\n".join(
        [
            line("GET", blobs + LAYER, 200, "67108864"),
            line("GET", blobs + LAYER, 206, "1000"),
            line("GET", blobs + OTHER, 200, "416"),
            line("HEAD", blobs + LAYER, 200, "0"),
            line("GET", blobs + LAYER, 401, "162"),
            line("GET", "/v2/v2/0123/manifests/latest", 200, "900"),
            line("GET", blobs + OTHER, 200, "-"),
            "time=... level=info msg=response completed",
        ]
    )
    assert shared.fetched(text, LAYER) == shared.Fetched(
        blob_gets=4, layer_gets=2, bytes=67108864 + 1000 + 416
    )


def test_the_access_log_is_read_from_the_mark_on(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("before\n")
    access = shared.AccessLog(path)
    access.mark()
    with path.open("a") as file:
        file.write("after\n")
    assert access.since() == "after\n"


def test_distribution_is_a_pull_through_cache_with_the_sandbox_users_credentials(
    tmp_path: Path,
) -> None:
    document = yaml.safe_load(shared.distribution_config(tmp_path, 5000, "http://127.0.0.1:1"))
    username, password = shared.REMOTE_USER
    assert document["proxy"] == {
        "remoteurl": "http://127.0.0.1:1",
        "username": username,
        "password": password,
    }
    assert document["storage"]["filesystem"] == {"rootdirectory": str(tmp_path)}
    assert document["http"]["addr"] == "127.0.0.1:5000"
    assert "auth" not in document


def test_haproxy_checks_every_replica_on_the_given_path() -> None:
    config = shared.haproxy_config(9000, [9001, 9002, 9003], "/v2/")
    assert "bind 127.0.0.1:9000" in config
    assert "option httpchk GET /v2/" in config
    for n, port in enumerate((9001, 9002, 9003)):
        assert f"server r{n} 127.0.0.1:{port} check" in config


def test_the_committed_run_has_every_setup_and_phase_in_its_table() -> None:
    results: dict[str, Any] = json.loads((DOCS / "shared.json").read_text())
    assert results["only"] == "shared"
    part = results["shared"]
    lines = report.shared_table(part)
    assert len(lines) == 2 + len(shared.SETUPS) * len(shared.PHASES)
    for setup in shared.SETUPS:
        assert sum(report.SHARED_LABELS[setup] in line for line in lines) == 2, setup
    cold = {run["setup"]: run for run in part["runs"] if run["phase"] == "cold"}
    # What docs/benchmark/README.md says of it: the shared cache fetched the layer once.
    assert cold["shared"]["upstream_layer_gets"] == 1
    assert all(run["failed"] == 0 for run in part["runs"])


def test_a_skipped_part_says_why() -> None:
    assert report.shared_table({"skipped": "weed is not built"}) == [
        "Shared cache: skipped (weed is not built)"
    ]
