"""``make mutation``: mutation testing of the pure modules against ``tests/unit``, by Cosmic Ray.

    python -m mutation [--jobs N] [--tools VENV] [--fail-under PERCENT] [MODULE ...]

Each module (all of ``MODULES`` when none is named) is mutated in a copy of the work tree of its
own under ``reports/mutation/<module>/``, so the work tree is never touched and modules run side
by side (``--jobs``). A mutant is tested with the unit test files that import its module (stopping
at the first failure, Hypothesis derandomized so a verdict repeats), in the project's venv; Cosmic
Ray itself runs in the tools' venv (``--tools``). Mutants inside type annotations are skipped
(never evaluated); survivors listed in ``mutation/equivalent.toml`` count as equivalent and leave
the score. A run of every module rewrites the scores and the list of equivalent mutants in
``docs/mutation.md``. Exit status 1 when a module scores below ``--fail-under`` or a mutant
listed as equivalent was killed.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "balena_registry_proxy"
# The pure modules: no I/O, so tests/unit can pin down everything they decide. Add new ones here.
MODULES = (
    "routes",
    "admission",
    "access",
    "rewrite",
    "headers",
    "denial",
    "errors",
    "upstream_errors",
    "ranges",
    "confirmations",
    "config",
    "forwarded",
    "accesslog",
    "realm",
    "requestid",
    "framing",
    "answers",
    "digests",
    "release_names",
    "releases",
    "resolution",
    "api_query",
    "envelope",
    "manifests",
    "sharing",
)
UNIT_TESTS = Path("tests/unit")
REPORTS = ROOT / "reports" / "mutation"
EQUIVALENT = ROOT / "mutation" / "equivalent.toml"
DOC = ROOT / "docs" / "mutation.md"
# What the copy of the work tree needs for tests/unit to run; nothing else is copied.
COPIED = ("src", "tests", "pyproject.toml", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
# Cosmic Ray replaces each operator by every other one; most of those only ever raise a
# TypeError (a set `|` made `**`) or cannot differ in CPython (`x == 0` made `x is 0`). Each
# operator keeps its counterparts: + and -, * and /, << and >>, | and & (and so on), and an
# identity test keeps its negation (`is None` made `is not None`).
_COUNTERPARTS = "Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul|"
_COUNTERPARTS += "LShift_RShift|RShift_LShift|BitOr_BitAnd|BitAnd_BitOr|BitXor_BitOr"
EXCLUDED_OPERATORS = (
    rf"core/ReplaceBinaryOperator_(?!(?:{_COUNTERPARTS})$)",
    r"core/ReplaceComparisonOperator_(?:Eq|NotEq|Lt|LtE|Gt|GtE)_(?:Is|IsNot)$",
    r"core/ReplaceComparisonOperator_(?:Is|IsNot)_(?:Eq|NotEq|Lt|LtE|Gt|GtE)$",
)


@dataclass(frozen=True)
class Equivalent:
    """A mutant that cannot change behaviour, listed with the reason."""

    module: str
    line: str
    mutant: str
    reason: str
    near: str = ""
    """Text of the lines around it, where the same line occurs twice (a dataclass decorator)."""

    def matches(self, mutant: Mutant) -> bool:
        return (self.module, self.line, self.mutant) == (
            mutant.module,
            mutant.line,
            mutant.mutant,
        ) and self.near in mutant.context


@dataclass(frozen=True)
class Mutant:
    """One mutant's verdict, read from Cosmic Ray's session."""

    module: str
    operator: str
    line_number: int
    definition: str
    outcome: str  # killed, survived, skipped, incompetent
    line: str
    mutant: str
    context: str = ""
    """The unchanged lines the diff shows around it."""


@dataclass
class Score:
    """A module's verdicts."""

    module: str
    seconds: float
    mutants: list[Mutant] = field(default_factory=list)
    equivalent: list[Mutant] = field(default_factory=list)
    wrongly_listed: list[Mutant] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for mutant in self.mutants if mutant.outcome == outcome)

    @property
    def survivors(self) -> list[Mutant]:
        return [m for m in self.mutants if m.outcome == "survived" and m not in self.equivalent]

    @property
    def percent(self) -> float:
        killed, survived = self.count("killed"), len(self.survivors)
        return 100.0 * killed / (killed + survived) if killed + survived else 100.0


def normalised(text: str) -> str:
    return " ".join(text.split())


def load_equivalents(path: Path = EQUIVALENT) -> list[Equivalent]:
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", [])
    return [
        Equivalent(
            e["module"],
            normalised(e["line"]),
            normalised(e["mutant"]),
            e["reason"],
            normalised(e.get("near", "")),
        )
        for e in entries
    ]


def imported(source: str, importer: str) -> set[str]:
    """The modules of the package that ``source`` (module ``importer``, dotted within the
    package; "" for a file outside it) imports, dotted within the package."""
    found: set[str] = set()
    package_parts = importer.split(".")[:-1] if importer else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                stem = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == PACKAGE or (node.module or "").startswith(f"{PACKAGE}."):
                stem = (node.module or "").removeprefix(PACKAGE).removeprefix(".")
            else:
                continue
            if stem:
                found.add(stem)
            found.update(f"{stem}.{a.name}" if stem else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            prefix = f"{PACKAGE}."
            names = (alias.name for alias in node.names)
            found.update(name.removeprefix(prefix) for name in names if name.startswith(prefix))
    return found


@functools.cache
def package_modules(root: Path) -> dict[str, set[str]]:
    """Each module of the package (dotted within it) and the package modules it imports."""
    source = root / "src" / PACKAGE
    graph: dict[str, set[str]] = {}
    for path in source.rglob("*.py"):
        parts = path.relative_to(source).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        importer = f"{name}.__init__" if parts[-1] == "__init__" else name
        graph[name] = imported(path.read_text(encoding="utf-8"), importer)
    return {name: {m for m in imports if m in graph} for name, imports in graph.items()}


def dependents(module: str, graph: dict[str, set[str]]) -> set[str]:
    """``module`` and every module of the package that imports it, directly or not."""
    found = {module}
    while True:
        more = {name for name, imports in graph.items() if imports & found} - found
        if not more:
            return found
        found |= more


@functools.cache
def unit_test_imports(root: Path) -> dict[str, set[str]]:
    """Each unit test file (relative to ``root``) and the package modules it imports."""
    return {
        str(path.relative_to(root)): imported(path.read_text(encoding="utf-8"), "")
        for path in sorted((root / UNIT_TESTS).glob("test_*.py"))
    }


def unit_tests_seeing(module: str, root: Path = ROOT) -> list[str]:
    """The unit test files that can see ``module``: those that import it first (the likeliest
    to kill its mutants, and the run stops at the first failure), then those that import a
    module that imports it."""
    seeing = dependents(module, package_modules(root))
    direct: list[str] = []
    indirect: list[str] = []
    for path, imports in unit_test_imports(root).items():
        if module in imports:
            direct.append(path)
        elif imports & seeing:
            indirect.append(path)
    return direct + indirect


def changed_lines(diff: str) -> tuple[str, str]:
    """The original and the mutated text of a unified diff, each its lines joined."""
    before: list[str] = []
    after: list[str] = []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            before.append(line[1:])
        elif line.startswith("+"):
            after.append(line[1:])
    return normalised(" ".join(before)), normalised(" ".join(after))


def context_lines(diff: str) -> str:
    """The unchanged lines a unified diff shows around the change, joined."""
    return normalised(" ".join(line[1:] for line in diff.splitlines() if line.startswith(" ")))


def outcome(result: dict[str, str | None] | None) -> str:
    if result is None:
        return "pending"
    if result["worker_outcome"] == "skipped":
        return "skipped"
    if result["worker_outcome"] != "normal":
        return "incompetent"
    return str(result["test_outcome"])


def read_session(module: str, dump: str) -> list[Mutant]:
    """The mutants of ``cosmic-ray dump`` output (one JSON ``[item, result]`` a line)."""
    mutants = []
    for text in dump.splitlines():
        item, result = json.loads(text)
        (mutation,) = item["mutations"]
        diff = (result or {}).get("diff") or ""
        before, after = changed_lines(diff)
        mutants.append(
            Mutant(
                module=module,
                operator=mutation["operator_name"],
                line_number=mutation["start_pos"][0],
                definition=mutation["definition_name"] or "<module>",
                outcome=outcome(result),
                line=before,
                mutant=after,
                context=context_lines(diff),
            )
        )
    return mutants


def judge(score: Score, equivalents: Iterable[Equivalent]) -> None:
    """Sort the listed equivalent mutants out of ``score``'s survivors; a listed one that was
    killed is not equivalent, and goes to ``wrongly_listed``."""
    listed = [e for e in equivalents if e.module == score.module]
    for mutant in score.mutants:
        if not any(e.matches(mutant) for e in listed):
            continue
        if mutant.outcome == "survived":
            score.equivalent.append(mutant)
        elif mutant.outcome == "killed":
            score.wrongly_listed.append(mutant)


class Runner:
    """Runs one module's session: copy, baseline, init, skip annotations, exec, dump."""

    def __init__(self, tools: Path, python: str) -> None:
        self.tools = tools
        self.python = python

    def engine(self, args: Sequence[str], cwd: Path) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [str(self.tools / "bin" / "python"), "-m", "mutation.engine", *args]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def run(self, module: str) -> Score:
        started = time.monotonic()
        work = REPORTS / module
        tree = work / "tree"
        shutil.rmtree(work, ignore_errors=True)
        for name in COPIED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, tree / name, ignore=IGNORED)
            else:
                tree.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tree / name)
        tests = unit_tests_seeing(module)
        if not tests:
            raise RuntimeError(f"{module}: no file in {UNIT_TESTS} imports it")
        command = [
            "env",
            f"PYTHONPATH={tree / 'src'}",
            self.python,
            *("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"),
            "--hypothesis-profile=mutation",
            *tests,
        ]
        baseline_start = time.monotonic()
        baseline = subprocess.run(command, cwd=tree, capture_output=True, text=True)
        if baseline.returncode != 0:
            raise RuntimeError(f"{module}: the unmutated tests fail:\n{baseline.stdout}")
        timeout = max(30.0, 10 * (time.monotonic() - baseline_start))
        # The baseline left compiled (and assertion-rewritten) files that every mutant's run
        # reads, Cosmic Ray writing none: all but the mutated module's, which must be compiled.
        for compiled in (tree / "src" / PACKAGE / "__pycache__").glob(f"{module}.*.pyc"):
            compiled.unlink()
        config = work / "cosmic-ray.toml"
        config.write_text(
            "[cosmic-ray]\n"
            f'module-path = "src/{PACKAGE}/{module}.py"\n'
            f"timeout = {timeout:.0f}\n"
            "excluded-modules = []\n"
            f"test-command = {json.dumps(' '.join(command))}\n"
            '[cosmic-ray.distributor]\nname = "local"\n'
            "[cosmic-ray.filters.operators-filter]\n"
            f"exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}\n",
            encoding="utf-8",
        )
        session = str(work / "session.sqlite")
        self.engine(["init", str(config), session], cwd=tree)
        self.engine(["skip-annotations", session], cwd=tree)
        self.engine(["filter-operators", session, str(config)], cwd=tree)
        self.engine(["exec", str(config), session], cwd=tree)
        dump = self.engine(["dump", session], cwd=tree)
        (work / "session.jsonl").write_text(dump, encoding="utf-8")
        shutil.rmtree(tree)
        seconds = time.monotonic() - started
        (work / "seconds").write_text(f"{seconds:.0f}\n", encoding="utf-8")
        return Score(module, seconds, read_session(module, dump))


def stored(module: str) -> Score:
    """``module``'s verdicts as its last run left them in ``reports/mutation/<module>/``."""
    work = REPORTS / module
    if not (work / "session.jsonl").exists():
        raise RuntimeError(f"{module}: no session of a run in {work}")
    seconds = float((work / "seconds").read_text(encoding="utf-8"))
    dump = (work / "session.jsonl").read_text(encoding="utf-8")
    return Score(module, seconds, read_session(module, dump))


def table(scores: Sequence[Score]) -> str:
    rows = [
        "| module | mutants | killed | survived | equivalent | score | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scores:
        tested = s.count("killed") + s.count("survived")
        rows.append(
            f"| `{s.module}` | {tested} | {s.count('killed')} | {len(s.survivors)} "
            f"| {len(s.equivalent)} | {s.percent:.1f} % | {s.seconds / 60:.1f} min |"
        )
    total = Score("all", 0.0, [m for s in scores for m in s.mutants])
    total.equivalent = [m for s in scores for m in s.equivalent]
    tested = total.count("killed") + total.count("survived")
    rows.append(
        f"| all | {tested} | {total.count('killed')} | {len(total.survivors)} "
        f"| {len(total.equivalent)} | {total.percent:.1f} % | |"
    )
    return "\n".join(rows)


def equivalents_list(equivalents: Sequence[Equivalent]) -> str:
    rows = ["| module | line | mutant | why it is equivalent |", "| --- | --- | --- | --- |"]
    for e in sorted(equivalents, key=lambda e: e.module):
        line, mutant = (text.replace("|", "\\|") for text in (e.line, e.mutant))
        near = f" (near `{e.near}`)" if e.near else ""
        rows.append(f"| `{e.module}` | `{line}`{near} | `{mutant}` | {e.reason} |")
    return "\n".join(rows)


def survivors_list(scores: Sequence[Score]) -> str:
    rows = ["| module | line | mutant |", "| --- | --- | --- |"]
    for score in scores:
        for m in score.survivors:
            line, mutant = (text.replace("|", "\\|") for text in (m.line, m.mutant))
            where = f"{score.module}.py:{m.line_number}"
            rows.append(f"| `{where}` | `{line}` | `{mutant}` |")
    return "\n".join(rows) if len(rows) > 2 else "None."


def replace_between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise RuntimeError(f"{DOC} has not one pair of {name} markers")
    return pattern.sub(lambda match: f"{match[1]}{body}\n{match[2]}", text)


def write_doc(
    scores: Sequence[Score], equivalents: Sequence[Equivalent], minutes: float, jobs: int
) -> None:
    made = sum(len(s.mutants) for s in scores)
    left_out = sum(s.count("skipped") for s in scores)
    summary = (
        f"{table(scores)}\n\n"
        f"Cosmic Ray {tool_version()}: {made} mutants made, {left_out} of them left out (in type "
        f"annotations, or an operator's unrelated replacements). The last run of every module "
        f"took {minutes:.0f} minutes, {jobs} modules at a time, on the 2-core development "
        "machine (`time`: each module's own)."
    )
    text = DOC.read_text(encoding="utf-8")
    text = replace_between(text, "mutation-scores", summary)
    text = replace_between(text, "mutation-survivors", survivors_list(scores))
    text = replace_between(text, "mutation-equivalent", equivalents_list(equivalents))
    DOC.write_text(text, encoding="utf-8")


def tool_version() -> str:
    pinned = (ROOT / "requirements" / "mutation.txt").read_text(encoding="utf-8")
    match = re.search(r"^cosmic-ray==(\S+)", pinned, re.MULTILINE)
    return match[1] if match else "?"


def report(score: Score) -> str:
    lines = [
        f"{score.module}: {score.percent:.1f} % ({score.count('killed')} killed, "
        f"{len(score.survivors)} survived, {len(score.equivalent)} equivalent, "
        f"{score.count('skipped')} skipped, {score.count('incompetent')} incompetent) "
        f"in {score.seconds:.0f} s"
    ]
    for m in score.survivors:
        where = f"{score.module}.py:{m.line_number} in {m.definition}"
        lines.append(f"  survived {where} [{m.operator}]")
        lines.append(f"    - {m.line}\n    + {m.mutant}")
    for m in score.wrongly_listed:
        lines.append(f"  KILLED, yet listed as equivalent: {score.module}.py:{m.line_number}")
        lines.append(f"    - {m.line}\n    + {m.mutant}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mutation", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="default: every pure module")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tools", type=Path, default=ROOT / ".venv" / "mutation-tools")
    parser.add_argument("--fail-under", type=float, default=90.0)
    parser.add_argument(
        "--stored",
        action="store_true",
        help="judge the sessions the last run left again (after mutation/equivalent.toml changed)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"not a pure module of MODULES: {', '.join(unknown)}")
    modules = args.modules or list(MODULES)
    equivalents = load_equivalents()
    runner = Runner(args.tools.resolve(), sys.executable)
    started = time.monotonic()
    # Biggest first, so that the last one to finish is a small one.
    order = sorted(modules, key=lambda m: -(ROOT / "src" / PACKAGE / f"{m}.py").stat().st_size)
    scores: dict[str, Score] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        run = stored if args.stored else runner.run
        for future in as_completed([pool.submit(run, module) for module in order]):
            score = future.result()
            judge(score, equivalents)
            scores[score.module] = score
            print(report(score), flush=True)
    ordered = [scores[m] for m in modules]
    minutes = (time.monotonic() - started) / 60
    # The time of the last run of every module; --stored runs nothing and keeps it.
    last_run = REPORTS / "minutes"
    if args.stored and last_run.exists():
        minutes = float(last_run.read_text(encoding="utf-8"))
    elif not args.stored and not args.modules:
        last_run.write_text(f"{minutes:.1f}\n", encoding="utf-8")
    print(f"\n{table(ordered)}\n\n{minutes:.1f} minutes")
    if not args.modules:
        write_doc(ordered, equivalents, minutes, args.jobs)
        matched = [m for s in ordered for m in s.equivalent]
        for e in equivalents:
            if not any(e.matches(m) for m in matched):
                print(f"listed as equivalent but no such survivor: {e.module}: {e.line}")
    low = [s.module for s in ordered if s.percent < args.fail_under]
    if low:
        print(f"below {args.fail_under:.0f} %: {', '.join(low)}")
    return 1 if low or any(s.wrongly_listed for s in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
