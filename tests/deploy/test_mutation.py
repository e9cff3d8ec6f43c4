"""`make mutation`'s driver (mutation/): which tests see a module, how verdicts are read."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from mutation.__main__ import (
    EQUIVALENT,
    EXCLUDED_OPERATORS,
    MODULES,
    PACKAGE,
    ROOT,
    Equivalent,
    Mutant,
    Score,
    changed_lines,
    imported,
    judge,
    load_equivalents,
    read_session,
    replace_between,
    survivors_list,
    table,
    unit_tests_seeing,
)


def test_every_pure_module_exists_and_has_unit_tests() -> None:
    for module in MODULES:
        assert (ROOT / "src" / PACKAGE / f"{module}.py").is_file(), module
        assert unit_tests_seeing(module), module


def test_the_pure_modules_are_those_of_the_import_contract() -> None:
    # A module the contract keeps free of I/O is one tests/unit can pin down: it is mutated.
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pure = next(
        c["source_modules"]
        for c in contracts["tool"]["importlinter"]["contracts"]
        if c["name"].startswith("The pure modules")
    )
    assert sorted(MODULES) == sorted(name.removeprefix(f"{PACKAGE}.") for name in pure)


def test_a_module_is_tested_by_the_files_importing_it_then_by_those_seeing_it() -> None:
    tests = unit_tests_seeing("requestid")
    assert tests[0] == "tests/unit/test_messages.py"  # imports it
    assert "tests/unit/test_headers.py" in tests  # imports headers, which imports it
    assert "tests/unit/test_ranges.py" not in tests


@pytest.mark.parametrize(
    ("source", "importer", "expected"),
    [
        ("from .errors import RegistryError", "routes", {"errors", "errors.RegistryError"}),
        ("from . import resources", "server", {"resources"}),
        ("from ..cli import main", "sandbox.command", {"cli", "cli.main"}),
        (f"from {PACKAGE}.access import Match", "", {"access", "access.Match"}),
        (f"from {PACKAGE} import resources", "", {"resources"}),
        (f"import {PACKAGE}.config", "", {"config"}),
        ("import json\nfrom collections import OrderedDict", "", set()),
    ],
)
def test_imports_of_the_package_are_found(source: str, importer: str, expected: set[str]) -> None:
    assert imported(source, importer) == expected


def test_a_diff_is_read_as_the_line_before_and_after() -> None:
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,2 @@\n x\n-    a(\n-      b)\n+    pass\n"
    assert changed_lines(diff) == ("a( b)", "pass")


def session_line(outcome: str | None, worker: str = "normal") -> str:
    item = {
        "mutations": [
            {
                "operator_name": "core/NumberReplacer",
                "start_pos": [7, 4],
                "definition_name": "f",
            }
        ]
    }
    result = {
        "worker_outcome": worker,
        "test_outcome": outcome,
        "diff": "--- a/m.py\n+++ b/m.py\n-x = 1\n+x = 2\n",
    }
    return json.dumps([item, result])


def test_verdicts_are_read_from_the_session() -> None:
    dump = "\n".join(
        [session_line("killed"), session_line("survived"), session_line(None, "skipped")]
    )
    mutants = read_session("m", dump)
    assert [m.outcome for m in mutants] == ["killed", "survived", "skipped"]
    assert (mutants[0].line_number, mutants[0].definition) == (7, "f")
    assert (mutants[0].line, mutants[0].mutant) == ("x = 1", "x = 2")


def mutant(outcome: str, line: str = "x = 1") -> Mutant:
    return Mutant("m", "core/NumberReplacer", 1, "f", outcome, line, "x = 2")


def test_listed_survivors_leave_the_score_and_listed_kills_are_reported() -> None:
    listed = [Equivalent("m", "x = 1", "x = 2", "why")]
    score = Score(
        "m", 0.0, [mutant("survived"), mutant("killed", "y = 1"), mutant("survived", "z = 1")]
    )
    judge(score, listed)
    assert score.equivalent == [mutant("survived")]
    assert score.survivors == [mutant("survived", "z = 1")]
    assert score.percent == 50.0
    killed_anyway = Score("m", 0.0, [mutant("killed")])
    judge(killed_anyway, listed)
    assert killed_anyway.wrongly_listed == [mutant("killed")]
    assert "| `m` | 3 | 1 | 1 | 1 | 50.0 % |" in table([score])


def test_a_line_that_occurs_twice_is_told_apart_by_the_lines_near_it() -> None:
    diff = (
        "--- a/m.py\n+++ b/m.py\n@@ -1,2 +1,2 @@\n"
        "-@dataclass(frozen=True)\n+@dataclass(frozen=False)\n class Match:\n"
    )
    (found,) = read_session(
        "m",
        json.dumps(
            [
                {
                    "mutations": [
                        {"operator_name": "o", "start_pos": [1, 0], "definition_name": None}
                    ]
                },
                {"worker_outcome": "normal", "test_outcome": "survived", "diff": diff},
            ]
        ),
    )
    assert found.context == "class Match:"
    listed = Equivalent(
        "m", "@dataclass(frozen=True)", "@dataclass(frozen=False)", "why", "class Match"
    )
    assert listed.matches(found)
    other = Equivalent(
        "m", "@dataclass(frozen=True)", "@dataclass(frozen=False)", "why", "class Entry"
    )
    assert not other.matches(found)


def test_every_listed_equivalent_mutant_has_a_module_and_a_reason() -> None:
    entries = tomllib.loads(EQUIVALENT.read_text(encoding="utf-8")).get("mutant", [])
    assert len(load_equivalents()) == len(entries)
    for entry in entries:
        assert (
            {"module", "line", "mutant", "reason"}
            <= set(entry)
            <= {
                "module",
                "line",
                "mutant",
                "reason",
                "near",
            }
        ), entry
        assert entry["module"] in MODULES, entry
        assert entry["reason"].strip(), entry


@pytest.mark.parametrize(
    ("operator", "excluded"),
    [
        ("core/ReplaceBinaryOperator_BitOr_Pow", True),
        ("core/ReplaceBinaryOperator_BitOr_BitAnd", False),
        ("core/ReplaceBinaryOperator_Add_Sub", False),
        ("core/ReplaceBinaryOperator_Add_Mul", True),
        ("core/ReplaceComparisonOperator_Eq_Is", True),
        ("core/ReplaceComparisonOperator_Is_Eq", True),
        ("core/ReplaceComparisonOperator_Is_IsNot", False),
        ("core/ReplaceComparisonOperator_Lt_LtE", False),
        ("core/NumberReplacer", False),
    ],
)
def test_operators_left_out(operator: str, excluded: bool) -> None:
    assert any(re.match(pattern, operator) for pattern in EXCLUDED_OPERATORS) is excluded


def test_a_section_of_the_docs_is_replaced_between_its_markers_whatever_it_held() -> None:
    empty = "a\n<!-- s:begin -->\n<!-- s:end -->\nb\n"
    written = replace_between(empty, "s", "new")
    assert written == "a\n<!-- s:begin -->\nnew\n<!-- s:end -->\nb\n"
    assert replace_between(written, "s", "newer") == written.replace("new", "newer")
    with pytest.raises(RuntimeError, match="not one pair"):
        replace_between("no markers", "s", "new")


def test_the_survivors_left_are_listed_with_where_they_are() -> None:
    score = Score("m", 0.0, [mutant("survived", "a | b"), mutant("killed")])
    assert survivors_list([score]).splitlines()[2:] == ["| `m.py:1` | `a \\| b` | `x = 2` |"]
    assert survivors_list([Score("m", 0.0, [mutant("killed")])]) == "None."
