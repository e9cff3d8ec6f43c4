"""The OCI distribution-spec conformance suite, read-only, against the proxy and the registry.

Each run reads one private release (gh_acme/secret 0.2.0) as alice: through the proxy by its
slug name, and from the registry behind it, directly, by its real repository, with the same
content listed. Every failure must be a known deviation (``conformance.DEVIATIONS``: inherited
from the registry, or the proxy's documented rule), and every known deviation must still fail:
one that passes is taken off the list. Reports go to ``reports/conformance/<upstream>-<target>/``
and a summary of each run to its ``summary.json``, from which ``make readme`` renders the
README's figures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

import pytest

from .. import matrix
from .conformance import (
    BRANCHES,
    DEVIATIONS,
    NOT_RUN,
    Case,
    ReadOnlyData,
    expected_failures,
    parse_junit,
    run_suite,
    suite_environment,
)
from .conftest import Upstream
from .go_tools import go_tool, pin
from .test_pull import ALICE, SECRET_PINNED

RESULTS = matrix.REPORTS / "conformance"
SLUG = "gh_acme/secret/0.2.0"
USERNAME, _, API_KEY = ALICE.partition(":")
CREDENTIALS = (USERNAME, API_KEY)


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["proxy", "registry"])
def test_conformance(target: str, go_upstream: Upstream) -> None:
    binary = go_tool("conformance")
    seeded = go_upstream.sandbox.seed[SECRET_PINNED]
    manifest = seeded.manifest
    assert manifest.config_digest is not None
    blobs = [manifest.config_digest, *manifest.layer_digests]
    if target == "proxy":
        registry, repository = go_upstream.proxy.host, SLUG
    else:
        registry, repository = go_upstream.sandbox.registry_host, seeded.repository
    data = ReadOnlyData(repository, ["latest"], [seeded.digest], blobs)
    results = RESULTS / f"{go_upstream.key}-{target}"
    shutil.rmtree(results, ignore_errors=True)

    cases = run_suite(binary, registry, data, CREDENTIALS, results)
    write_summary(results, target, go_upstream, cases)

    failed = {case.name: case.message for case in cases if case.status == "failed"}
    expected = expected_failures(target, go_upstream.key)
    unexpected = {name: message for name, message in failed.items() if name not in expected}
    assert not unexpected, f"conformance failures (reports in {results}): {unexpected}"
    fixed = set(expected) - set(failed)
    assert not fixed, f"known deviations that now pass, take them off DEVIATIONS: {fixed}"
    # Every read of the listed content passed: a run that tested nothing would pass the above.
    reads = [case for case in cases if case.name.startswith(("read-only/head", "read-only/pull"))]
    assert len(reads) == 2 * (2 + len(blobs)), reads
    assert {case.status for case in reads} == {"passed"}


def write_summary(results: Path, target: str, upstream: Upstream, cases: list[Case]) -> None:
    """The run's counts, failures (with their reasons) and switched-off tests, for the README."""
    counts = Counter(case.status for case in cases)
    expected = expected_failures(target, upstream.key)
    failures = sorted({case.name for case in cases if case.status == "failed"})
    summary = {
        "suite": dataclasses.asdict(pin("conformance")),
        "target": target,
        "upstream": upstream.key,
        "upstream_version": upstream.version,
        "branches": list(BRANCHES),
        "not_run": NOT_RUN,
        "counts": {
            status: counts[status] for status in ("passed", "failed", "skipped", "disabled")
        },
        "failures": [
            {
                "test": name,
                "origin": expected[name].origin if name in expected else "unexpected",
                "reason": expected[name].reason if name in expected else "",
            }
            for name in failures
        ],
        "disabled": sorted({case.name for case in cases if case.status == "disabled"}),
        "skipped": sorted({case.name for case in cases if case.status == "skipped"}),
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


JUNIT = """<testsuites><testsuite name="OCI Conformance Test">
<testcase name="OCI Conformance Test/read-only/tag-list" status="passed"></testcase>
<testcase name="OCI Conformance Test/read-only/push/manifest-by-tag" status="skipped">
<system-err>read-only/push/manifest-by-tag: skipping test:
  api Manifest put by tag is disabled in the configuration</system-err></testcase>
<testcase name="OCI Conformance Test/read-only/head/blob-head" status="skipped">
<system-err>registry returned status 405</system-err></testcase>
<testcase name="OCI Conformance Test/empty/referrers" status="failure">
<system-out>unexpected status code, expected one of [200], received 404</system-out></testcase>
<testcase name="OCI Conformance Test/ping" status="error"><system-out>boom</system-out></testcase>
</testsuite></testsuites>"""


def test_junit_cases_are_read_with_their_outcome() -> None:
    cases = parse_junit(ElementTree.fromstring(JUNIT))  # noqa: S314 -- a literal
    assert [(case.name, case.status) for case in cases] == [
        ("read-only/tag-list", "passed"),
        ("read-only/push/manifest-by-tag", "disabled"),
        ("read-only/head/blob-head", "skipped"),
        ("empty/referrers", "failed"),
        ("ping", "failed"),
    ]
    assert cases[3].message == "unexpected status code, expected one of [200], received 404"


def test_read_only_data_goes_only_to_the_branch_that_reads_it() -> None:
    data = ReadOnlyData("gh_acme/secret/0.2.0", ["latest"], ["sha256:m"], ["sha256:a", "sha256:b"])
    reading = suite_environment("127.0.0.1:1", data, CREDENTIALS, "read-only")
    assert reading["OCI_RO_DATA_BLOBS"] == "sha256:a sha256:b"
    assert reading["OCI_FILTER_TEST"] == "OCI Conformance Test/read-only"
    assert reading["OCI_API_PUSH"] == "false"
    # With read-only data listed, a run without the branch that reads it writes no reports.
    for branch in set(BRANCHES) - {"read-only"}:
        other = suite_environment("127.0.0.1:1", data, CREDENTIALS, branch)
        assert not [name for name in other if name.startswith("OCI_RO_DATA")]


def test_every_deviation_names_a_test_of_a_branch_that_runs() -> None:
    for deviation in DEVIATIONS:
        assert deviation.test.split("/")[0] in BRANCHES, deviation
        assert deviation.origin in ("inherited", "by design")
        # Inherited means the registry fails it too, wherever the proxy in front of it does.
        if deviation.origin == "inherited":
            upstreams = {upstream for target, upstream in deviation.where if target == "proxy"}
            assert {("registry", upstream) for upstream in upstreams} <= deviation.where
