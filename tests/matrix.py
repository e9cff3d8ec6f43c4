"""The client matrix: which client, at which version, did what, against which registry.

A test marked ``@pytest.mark.matrix(client, case)``, or ``matrix(case)`` when its
``layout_client`` or ``ctr`` parameter names the client, is recorded with its outcome: ``pass``,
``fail``, ``xfail`` (a known defect, see the test's reason) or ``skip``. The upstream is the
``go_upstream`` parameter of the test, or Debian's registry for tests on the shared sandbox.
Fixtures note the version of every program they hand out. At the end of the session the
records go to ``reports/clients.json``, from which ``make readme`` renders the README's matrix;
nothing in the matrix is written by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
CLIENTS_JSON = REPORTS / "clients.json"
# The upstream of every test that does not choose one: the shared sandbox's Debian registry.
DEFAULT_UPSTREAM = "registry2"
# Worst first: a case run several times (parametrized) is as good as its worst run.
_RANK = ("fail", "skip", "xfail", "pass")


@dataclass(frozen=True)
class Record:
    """One case of one client against one upstream, and how it went."""

    client: str
    case: str
    upstream: str
    outcome: str


_records: dict[tuple[str, str, str], str] = {}
_versions: dict[str, str] = {}


def version_of(command: list[str]) -> str:
    """The first ``x.y.z`` that ``command`` (a program's version command) prints."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"(?<![\d.])(\d+\.\d+\.\d+)", result.stdout + result.stderr)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    assert found, f"{command} printed no version: {result.stdout}{result.stderr}"
    return found[1]


def note_version(program: str, command: list[str]) -> str:
    """The version of ``program`` (a client, or an upstream key), remembered for the matrix."""
    if program not in _versions:
        _versions[program] = version_of(command)
    return _versions[program]


def outcome(report: pytest.TestReport) -> str | None:
    """The matrix outcome ``report`` settles, or None for a phase that settles nothing."""
    if report.skipped:
        return "xfail" if hasattr(report, "wasxfail") else "skip"
    if report.failed:
        return "fail"
    return "pass" if report.when == "call" else None


def observe(item: pytest.Item, report: pytest.TestReport) -> None:
    """Record ``report`` if ``item`` is a matrix case."""
    marker = item.get_closest_marker("matrix")
    settled = outcome(report)
    if marker is None or settled is None:
        return
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if len(marker.args) == 2:
        client, case = marker.args
    else:
        client, case = params.get("layout_client", params.get("ctr")), *marker.args
    key = (client, case, params.get("go_upstream", DEFAULT_UPSTREAM))
    previous = _records.get(key, "pass")
    _records[key] = min(previous, settled, key=_RANK.index)


def write() -> None:
    """Write what this session recorded to ``reports/clients.json`` (nothing if nothing ran)."""
    if not _records:
        return
    # In the order the cases ran, which is the order the test modules define them in.
    records = [Record(*key, outcome) for key, outcome in _records.items()]
    REPORTS.mkdir(exist_ok=True)
    document = {"versions": _versions, "records": [asdict(record) for record in records]}
    CLIENTS_JSON.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
