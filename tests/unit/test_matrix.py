"""How a test's reports settle its client matrix outcome."""

from __future__ import annotations

from typing import Literal

import pytest

from tests.matrix import outcome


def report(
    when: Literal["setup", "call", "teardown"],
    result: Literal["passed", "failed", "skipped"],
    xfail: bool = False,
) -> pytest.TestReport:
    made = pytest.TestReport(
        nodeid="t", location=("t.py", 0, "t"), keywords={}, outcome=result, longrepr=None, when=when
    )
    if xfail:
        made.wasxfail = "a known defect"
    return made


@pytest.mark.parametrize(
    ("when", "result", "xfail", "settled"),
    [
        ("setup", "passed", False, None),
        ("call", "passed", False, "pass"),
        ("teardown", "passed", False, None),
        ("setup", "skipped", False, "skip"),
        ("setup", "failed", False, "fail"),
        ("call", "failed", False, "fail"),
        ("teardown", "failed", False, "fail"),
        ("call", "skipped", True, "xfail"),
    ],
)
def test_outcome(
    when: Literal["setup", "call", "teardown"],
    result: Literal["passed", "failed", "skipped"],
    xfail: bool,
    settled: str | None,
) -> None:
    assert outcome(report(when, result, xfail)) == settled
