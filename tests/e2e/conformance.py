"""Running the OCI distribution-spec conformance suite read-only, and reading its verdicts.

The suite (``conformance`` in go-tools.txt) is configured by ``OCI_*`` variables: push and
delete off, and the content of one seeded release listed up front (its tag, manifest digest and
blob digests), read from one repository with a sandbox user's credentials, so every request
walks the registry's 401 challenge, the token service and the authorised retry.

At the pinned version the suite cannot write its reports when push is off: a blob test branch
skipped for that leaves a status without its data, and ``ReportResultsYAML`` dereferences it
(nil pointer) before junit.xml and report.html are written; a filtered run that leaves the
read-only data untested fails the same way on its ``Unknown`` status. So each branch that
applies to a pull-only registry runs on its own, through the suite's own ``OCI_FILTER_TEST``,
with the read-only data listed only for the branch that reads it. The two blob branches are not
run: they push before they read anything.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT_NAME = "OCI Conformance Test"
# The suite's top-level branches that apply to a registry that only serves pulls.
BRANCHES = ("ping", "empty", "read-only", "missing-manifest", "invalid-digest-format")
# The blob branches, which upload, mount and delete: none of their tests reads without a push.
NOT_RUN = ("sha256 blobs", "sha512 blobs")
READ_ONLY_BRANCH = "read-only"
# What the suite says in a test's output when the configuration switched its API off.
_DISABLED = "is disabled in the configuration"


@dataclass(frozen=True)
class ReadOnlyData:
    """Content the registry already holds, for the suite to read: one release's image."""

    repository: str
    tags: Sequence[str]
    manifests: Sequence[str]
    blobs: Sequence[str]


@dataclass(frozen=True)
class Case:
    """One test case of the suite's junit report."""

    name: str
    """The test's path below the suite's root, e.g. ``read-only/pull/blob-get``."""
    status: str
    """``passed``, ``failed`` (a failure or an error of the suite), ``skipped`` or ``disabled``."""
    message: str


@dataclass(frozen=True)
class Deviation:
    """A test known to fail, where, and why: the README lists these."""

    test: str
    where: frozenset[tuple[str, str]]
    """The (target, upstream) pairs that fail it: ``proxy`` or ``registry``, and the upstream."""
    origin: str
    """``inherited`` (the registry fails it too) or ``by design`` (the proxy's documented rule)."""
    reason: str


_EVERYWHERE = frozenset(
    (target, upstream)
    for target in ("proxy", "registry")
    for upstream in ("registry2", "registry3")
)
DEVIATIONS = (
    Deviation(
        "empty/referrers",
        _EVERYWHERE,
        "inherited",
        "distribution 2.8 and 3.1 have no referrers API: GET /v2/<name>/referrers/<digest> "
        "answers 404 text/plain, and clients fall back to the referrers tag schema",
    ),
    Deviation(
        "invalid-digest-format/manifest-get",
        frozenset({("proxy", "registry2"), ("registry", "registry2")}),
        "inherited",
        "distribution 2.8 answers 500 UNKNOWN to GET /v2/<name>/manifests/sha256:baddigeststring "
        "(a reference that is neither a tag nor a valid digest); distribution 3 answers 400",
    ),
    Deviation(
        "missing-manifest/by-tag",
        frozenset({("proxy", "registry2"), ("proxy", "registry3")}),
        "by design",
        "every tag of a release name is the release's one image (`:<tag>` is ignored, see Image "
        "names), so GET of an unknown tag answers 200 with the release, not 404",
    ),
)


def expected_failures(target: str, upstream: str) -> dict[str, Deviation]:
    """The deviations that apply to ``target`` in front of ``upstream``, by test name."""
    return {d.test: d for d in DEVIATIONS if (target, upstream) in d.where}


def suite_environment(
    registry: str, data: ReadOnlyData, credentials: tuple[str, str], branch: str
) -> dict[str, str]:
    """The ``OCI_*`` settings of a read-only run of ``branch`` against ``registry``.

    Only PATH and HOME are kept from this process: any other ``OCI_*`` variable, legacy ones
    included, would change the configuration.
    """
    username, password = credentials
    environment = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.environ.get("HOME", "/"),
        "OCI_REGISTRY": registry,
        "OCI_TLS": "disabled",
        "OCI_REPO1": data.repository,
        "OCI_REPO2": data.repository,
        "OCI_USERNAME": username,
        "OCI_PASSWORD": password,
        "OCI_API_PUSH": "false",
        "OCI_API_BLOBS_DELETE": "false",
        "OCI_API_MANIFESTS_DELETE": "false",
        "OCI_API_TAGS_DELETE": "false",
        "OCI_RESULTS_DIR": ".",
        "OCI_FILTER_TEST": f"{ROOT_NAME}/{branch}",
    }
    if branch == READ_ONLY_BRANCH:
        environment |= {
            "OCI_RO_DATA_TAGS": " ".join(data.tags),
            "OCI_RO_DATA_MANIFESTS": " ".join(data.manifests),
            "OCI_RO_DATA_BLOBS": " ".join(data.blobs),
        }
    return environment


def run_suite(
    binary: Path,
    registry: str,
    data: ReadOnlyData,
    credentials: tuple[str, str],
    results: Path,
) -> list[Case]:
    """Run every branch of ``BRANCHES``; each one's reports go to ``results/<branch>/``.

    The junit reports are also merged into ``results/junit.xml``. Raises ``RuntimeError`` when
    a run wrote no junit report (the suite crashed or could not start).
    """
    cases: list[Case] = []
    suites = ElementTree.Element("testsuites", name=ROOT_NAME)
    for branch in BRANCHES:
        directory = results / branch
        directory.mkdir(parents=True)
        # Its working directory is empty: the suite would read an oci-conformance.yaml there.
        completed = subprocess.run(
            [str(binary)],
            cwd=directory,
            env=suite_environment(registry, data, credentials, branch),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (directory / "output.txt").write_text(completed.stdout + completed.stderr)
        junit = directory / "junit.xml"
        if not junit.exists():
            raise RuntimeError(
                f"the suite wrote no junit report for {branch} (exit {completed.returncode}):\n"
                + (completed.stdout + completed.stderr)[-3000:]
            )
        # The suite's own report, just written by the pinned build: not untrusted input.
        document = ElementTree.parse(junit).getroot()  # noqa: S314
        suites.extend(document.iter("testsuite"))
        cases += parse_junit(document)
    ElementTree.ElementTree(suites).write(results / "junit.xml", encoding="unicode")
    return cases


def parse_junit(document: ElementTree.Element) -> list[Case]:
    """The test cases of one of the suite's junit reports."""
    cases = []
    for testcase in document.iter("testcase"):
        name = testcase.attrib["name"].removeprefix(f"{ROOT_NAME}/")
        status = testcase.attrib.get("status", "")
        # The suite writes a test's errors to system-out and its log to system-err.
        message = testcase.findtext("system-out") or ""
        output = testcase.findtext("system-err") or ""
        if status in ("failure", "error"):
            status = "failed"
        elif status == "skipped" and _DISABLED in output:
            status = "disabled"
        elif status not in ("passed", "skipped"):
            raise ValueError(f"{name}: unknown junit status {status!r}")
        cases.append(Case(name, status, message.strip()))
    return cases
