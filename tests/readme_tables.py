"""Render the README's settings table, and its client matrix and conformance figures from the
last test run's records.

``python -m tests.readme_tables`` rewrites the README between its ``<!-- name:begin -->`` and
``<!-- name:end -->`` markers; ``--check`` only says whether the README is current (exit 1 if
not). The records are ``reports/clients.json`` (see ``matrix``) and the conformance runs'
``reports/conformance/*/summary.json``. A record of a skipped case means the run was not
complete, and is refused rather than rendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from balena_registry_proxy.config import OPTIONS

from .matrix import CLIENTS_JSON, REPORTS, ROOT

README = ROOT / "README.md"
CONFORMANCE = REPORTS / "conformance"
UPSTREAMS = {"registry2": "registry {}", "registry3": "registry {}"}
SYMBOLS = {"pass": "✓", "fail": "✗", "xfail": "✗ known defect"}
# The cases several clients run, in the order the matrix shows them.
CASE_ORDER = (
    "pull by every selector form",
    "pull a public release",
    "pull by digest",
    "multi-platform index, every platform",
    "multi-platform index, one platform",
    "index child by digest",
    "private app, with credentials",
    "private app, without credentials: refused",
    "private app, with and without credentials",
)


class IncompleteRecordsError(ValueError):
    """The records do not describe a complete run."""


def render_matrix(document: Mapping[str, Any]) -> str:
    """The client matrix: a row per client and case, a column per upstream registry."""
    versions: dict[str, str] = document["versions"]
    records: list[dict[str, str]] = document["records"]
    skipped = [r for r in records if r["outcome"] == "skip"]
    if skipped:
        raise IncompleteRecordsError(f"{len(skipped)} cases were skipped, e.g. {skipped[0]}")
    upstreams = [key for key in UPSTREAMS if any(r["upstream"] == key for r in records)]
    outcomes = {(r["client"], r["case"], r["upstream"]): r["outcome"] for r in records}
    # Clients by name, whatever order the tests ran in; each one's cases in the order of
    # CASE_ORDER, then its own in the order they ran.
    runs = list(dict.fromkeys((r["client"], r["case"]) for r in records))
    rank = {case: number for number, case in enumerate(CASE_ORDER)}
    rows = sorted(runs, key=lambda row: (row[0], rank.get(row[1], len(rank)), runs.index(row)))
    labels = [UPSTREAMS[key].format(versions[key]) for key in upstreams]
    lines = [
        _row(["client", "version", "case", *labels]),
        _row(["---"] * 3 + [":---:"] * len(upstreams)),
    ]
    shown = None
    for client, case in rows:
        # The client and its version head its first row only.
        named = [client, versions[client]] if client != shown else ["", ""]
        shown = client
        cells = [SYMBOLS.get(outcomes.get((client, case, key), ""), "not run") for key in upstreams]
        lines.append(_row([*named, case, *cells]))
    return "\n".join(lines)


def render_conformance(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Counts of every conformance run, then what failed and what was switched off, and why."""
    if not summaries:
        raise IncompleteRecordsError(f"no conformance summaries in {CONFORMANCE}")
    first = summaries[0]
    suite = first["suite"]
    runs = sorted(summaries, key=lambda s: (s["upstream"], s["target"] != "proxy"))
    lines = [
        f"Suite `{suite['package']}` {suite['version']}, read-only: push and delete off, "
        f"branches {_names(first['branches'])}.",
        "",
        _row(["run", "passed", "failed", "disabled (push, delete)", "skipped"]),
        _row(["---", "---:", "---:", "---:", "---:"]),
    ]
    failures: dict[str, dict[str, Any]] = {}
    for run in runs:
        counts = [str(run["counts"][k]) for k in ("passed", "failed", "disabled", "skipped")]
        lines.append(_row([_run_label(run), *counts]))
        for failure in run["failures"]:
            if failure["origin"] == "unexpected":
                raise IncompleteRecordsError(f"{_run_label(run)}: {failure['test']} failed")
            failures.setdefault(failure["test"], {**failure, "runs": []})["runs"].append(run)
    lines += [
        "",
        "Known failures, each checked to still fail (the test fails once one passes):",
        "",
        _row(["test", "fails on", "origin", "why"]),
        _row(["---"] * 4),
    ]
    for name, failure in failures.items():
        where = ", ".join(_run_label(run, short=True) for run in failure["runs"])
        lines.append(_row([f"`{name}`", where, failure["origin"], failure["reason"]]))
    disabled = sorted({name for run in runs for name in run["disabled"]})
    skipped = sorted({name for run in runs for name in run["skipped"]})
    lines += [
        "",
        f"Switched off, the proxy being read-only by design: {_names(disabled)}. Not run, as "
        f"they push before they read anything: {_names(first['not_run'])}. Recorded by the "
        f"suite as unsupported: {_names(skipped) if skipped else 'nothing'}.",
    ]
    return "\n".join(lines)


def render_settings() -> str:
    """The settings table, from the options the proxy reads."""
    lines = [_row(["variable", "flag", "default", "meaning"]), _row(["---"] * 4)]
    for option in OPTIONS:
        flag = f"`{option.flag}`"
        if option.switch:
            flag += f" (alone: on), `{option.negative_flag}`"
        default = f"`{option.shown_default}`" if option.shown_default else ""
        lines.append(_row([f"`{option.env}`", flag, default, option.help]))
    return "\n".join(lines)


def _run_label(run: Mapping[str, Any], *, short: bool = False) -> str:
    """``proxy → registry 2.8.2``, or ``registry 2.8.2 directly`` (short: just the version)."""
    version = run["upstream_version"]
    registry = version if short else UPSTREAMS[run["upstream"]].format(version)
    return f"proxy → {registry}" if run["target"] == "proxy" else f"{registry} directly"


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the markers of section ``name`` replaced by ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"the README needs exactly one {begin} and one {end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def rendered_readme(readme: str, clients: Mapping[str, Any], summaries: Sequence[Any]) -> str:
    """``readme`` with every generated section brought up to date."""
    text = replace_section(readme, "settings", render_settings())
    text = replace_section(text, "client-matrix", render_matrix(clients))
    return replace_section(text, "conformance", render_conformance(summaries))


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the README's generated sections, or with ``--check`` only compare them."""
    parser = argparse.ArgumentParser(prog="python -m tests.readme_tables", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not current")
    args = parser.parse_args(argv)
    try:
        clients = json.loads(CLIENTS_JSON.read_text())
        summaries = [json.loads(p.read_text()) for p in sorted(CONFORMANCE.glob("*/summary.json"))]
        current = README.read_text()
        wanted = rendered_readme(current, clients, summaries)
    except (OSError, ValueError) as error:
        print(f"cannot render the README's tables: {error}", file=sys.stderr)
        return 1
    if args.check:
        if wanted != current:
            print("README.md is not current: run the tests, then make readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
