"""bench/pull.py's arithmetic and checks, and the whole-pull table of the committed run
(docs/benchmark/pull.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import pull, report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmark"


def run(target: str, seconds: float, cpu: float | None = None) -> dict[str, Any]:
    return {"target": target, "seconds": seconds, "proxy_cpu_s": cpu}


def test_summary_is_medians_ranges_and_what_the_proxy_adds() -> None:
    runs = [
        run("registry", 0.30),
        run("registry", 0.20),
        run("registry", 0.25),
        run("alias", 0.40, 0.03),
        run("alias", 0.30, 0.05),
        run("alias", 0.35, 0.04),
    ]
    summary = pull.summarize(runs)
    assert summary["registry"] == {
        "median_s": 0.25,
        "min_s": 0.2,
        "max_s": 0.3,
        "spread_s": 0.1,
        "proxy_cpu_s": None,
        "added_s": 0.0,
        "vs_direct": 1.0,
    }
    assert summary["alias"]["median_s"] == 0.35
    assert summary["alias"]["added_s"] == 0.1
    assert summary["alias"]["vs_direct"] == 1.4
    assert summary["alias"]["proxy_cpu_s"] == 0.04
    assert list(summary) == ["registry", "alias"]


@pytest.mark.parametrize(
    ("target", "counted"),
    [
        ("cache-cold", {"hit": 1, "joined": 0, "miss": 6}),
        ("cache-warm", {"hit": 6, "joined": 0, "miss": 1}),
        ("cache-warm", {"hit": 7, "joined": 1, "miss": 0}),
        ("resolver-cold", {"api_requests": 0, "realm_token_requests": 2}),
        ("resolver-warm", {"api_requests": 1, "realm_token_requests": 1}),
    ],
)
def test_a_figure_the_proxys_counters_contradict_is_refused(
    target: str, counted: dict[str, int]
) -> None:
    with pytest.raises(RuntimeError, match=target):
        pull._check_counted(target, counted, 7)


def test_figures_the_counters_confirm_pass() -> None:
    pull._check_counted("cache-cold", {"hit": 0, "joined": 0, "miss": 7}, 7)
    pull._check_counted("cache-warm", {"hit": 7, "joined": 0, "miss": 0}, 7)
    pull._check_counted("resolver-cold", {"api_requests": 1, "realm_token_requests": 2}, 7)
    pull._check_counted("resolver-warm", {"api_requests": 0, "realm_token_requests": 1}, 7)


def test_the_committed_run_has_every_target_in_its_table() -> None:
    results: dict[str, Any] = json.loads((DOCS / "pull.json").read_text())
    assert results["only"] == "pull"
    lines = report.pull_table(results["pull"])
    assert len(lines) == 2 + len(pull.TARGETS)
    for target in pull.TARGETS:
        assert any(report.PULL_LABELS[target] in line for line in lines), target
    assert results["pull"]["image"]["layers"] == 6
