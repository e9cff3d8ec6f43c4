"""The README's generated tables, from records of a test run."""

from __future__ import annotations

from typing import Any

import pytest

from balena_registry_proxy.config import OPTIONS
from tests.matrix import ROOT
from tests.readme_tables import (
    IncompleteRecordsError,
    render_conformance,
    render_matrix,
    render_settings,
    replace_section,
)

VERSIONS = {"crane": "0.22.1", "skopeo": "1.9.3", "registry2": "2.8.2", "registry3": "3.1.2"}


def record(client: str, case: str, upstream: str, outcome: str = "pass") -> dict[str, str]:
    return {"client": client, "case": case, "upstream": upstream, "outcome": outcome}


def test_matrix_has_a_row_per_client_and_case_and_a_column_per_registry() -> None:
    # Clients by name; the cases several clients run before a client's own.
    records = [
        record("skopeo", "pull by digest", "registry2"),
        record("crane", "crane ls", "registry2", "xfail"),
        record("crane", "pull by digest", "registry2"),
        record("crane", "crane ls", "registry3"),
        record("crane", "pull by digest", "registry3", "fail"),
    ]
    table = render_matrix({"versions": VERSIONS, "records": records}).splitlines()
    assert table == [
        "| client | version | case | registry 2.8.2 | registry 3.1.2 |",
        "| --- | --- | --- | :---: | :---: |",
        "| crane | 0.22.1 | pull by digest | ✓ | ✗ |",
        "|  |  | crane ls | ✗ known defect | ✓ |",
        "| skopeo | 1.9.3 | pull by digest | ✓ | not run |",
    ]


def test_a_skipped_case_is_an_incomplete_run() -> None:
    records = [record("crane", "pull by digest", "registry2", "skip")]
    with pytest.raises(IncompleteRecordsError, match="skipped"):
        render_matrix({"versions": VERSIONS, "records": records})


def summary(target: str, upstream: str, failures: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "suite": {"package": "example.com/conformance", "version": "v0.0.0-1"},
        "target": target,
        "upstream": upstream,
        "upstream_version": VERSIONS[upstream],
        "branches": ["ping", "read-only"],
        "not_run": ["sha256 blobs"],
        "counts": {"passed": 5, "failed": len(failures), "skipped": 0, "disabled": 2},
        "failures": failures,
        "disabled": ["read-only/push/manifest-by-tag"],
        "skipped": [],
    }


def test_conformance_counts_every_run_and_says_why_each_failure_is_known() -> None:
    referrers = {"test": "empty/referrers", "origin": "inherited", "reason": "no referrers API"}
    text = render_conformance(
        [summary("registry", "registry2", [referrers]), summary("proxy", "registry2", [referrers])]
    )
    assert "| proxy → registry 2.8.2 | 5 | 1 | 2 | 0 |" in text
    assert "| registry 2.8.2 directly | 5 | 1 | 2 | 0 |" in text
    # The proxy's run comes first, whatever order the summaries were read in.
    assert text.index("proxy → registry") < text.index("registry 2.8.2 directly")
    row = "| `empty/referrers` | proxy → 2.8.2, 2.8.2 directly | inherited | no referrers API |"
    assert row in text
    assert "`read-only/push/manifest-by-tag`" in text
    assert "`sha256 blobs`" in text


def test_an_unexpected_conformance_failure_is_not_rendered() -> None:
    unexpected = {"test": "ping", "origin": "unexpected", "reason": ""}
    with pytest.raises(IncompleteRecordsError, match="ping"):
        render_conformance([summary("proxy", "registry3", [unexpected])])


def test_sections_are_replaced_between_their_markers_only() -> None:
    text = "a\n<!-- t:begin -->\nold\n<!-- t:end -->\nb\n"
    assert replace_section(text, "t", "new") == "a\n<!-- t:begin -->\nnew\n<!-- t:end -->\nb\n"
    with pytest.raises(ValueError, match="exactly one"):
        replace_section(text + text, "t", "new")
    with pytest.raises(ValueError, match="exactly one"):
        replace_section("no markers", "t", "new")


def test_the_readme_settings_table_is_the_options_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert replace_section(readme, "settings", render_settings()) == readme, (
        "the README's settings differ from config.py: make readme"
    )


def test_the_settings_table_has_every_option_once() -> None:
    rows = render_settings().splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ").strip("`") for row in rows] == [
        option.env for option in OPTIONS
    ]
    assert "`--proxy-auth` (alone: on), `--no-proxy-auth`" in render_settings()
