"""The Makefile: what `make test` and `make demo` install and run, read from `make -n` (which
prints the commands without running them) for a venv that does not exist yet, and the check
for Debian's python3.X-venv, run for real with stand-ins for Python, id and apt-get.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from .files import MAKEFILE, REQUIREMENTS, ROOT, find_tool, missing
from .locks import read_lock

PACKAGE = ROOT / "src" / "balena_registry_proxy"


def make(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``make -f Makefile ARGUMENTS`` in the repository."""
    tool = find_tool("make")
    if tool is None:
        missing("make not found; install it with: apt-get install make")
    return subprocess.run(
        [tool, "--no-print-directory", "-C", str(ROOT), "-f", str(MAKEFILE), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def planned(target: str, venv: Path) -> list[list[str]]:
    """The commands ``make TARGET`` would run for a new venv at ``venv``, as argument lists."""
    result = make("-n", f"VENV={venv}", target)
    assert result.returncode == 0, result.stderr
    joined = result.stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [command for command in commands if command[:1] and command[0].endswith("/pip")]


def requirement_files(command: list[str]) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word in ("-r", "--requirement")]


def test_pytest_says_why_tests_were_skipped(tmp_path: Path) -> None:
    for target in ("test", "unit", "e2e"):
        runs = [c for c in planned(target, tmp_path / "venv") if c[0].endswith("/pytest")]
        assert runs, target
        for command in runs:
            reports = [word[2:] for word in command if word.startswith("-r")]
            assert any("s" in chars or "a" in chars for chars in reports), command


def test_the_venv_is_the_dev_lock_hashes_checked(tmp_path: Path) -> None:
    installs = pip_installs(planned("test", tmp_path / "venv"))
    assert [requirement_files(command) for command in installs if "-r" in command] == [
        ["requirements/dev.txt"]
    ]
    for command in installs:
        assert "--require-hashes" in command or "--no-deps" in command, command


def test_the_demo_installs_only_what_the_proxy_runs_with(tmp_path: Path) -> None:
    installs = pip_installs(planned("demo", tmp_path / "venv"))
    assert installs
    read = {file for command in installs for file in requirement_files(command)}
    assert read == {"requirements/sandbox.txt", "requirements/build.txt"}
    for command in installs:
        assert "--require-hashes" in command or "--no-deps" in command, command
        assert not any("[" in word for word in command), f"extras installed: {command}"


def imported_distributions() -> set[str]:
    """The distributions whose modules src/balena_registry_proxy imports, the sandbox's too."""
    modules: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    modules -= set(sys.stdlib_module_names) | {PACKAGE.name}
    providers = importlib.metadata.packages_distributions()
    unknown = {module for module in modules if module not in providers}
    assert not unknown, f"no installed distribution provides {unknown}"
    return {canonicalize_name(name) for module in modules for name in providers[module]}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``tree`` but those under ``if TYPE_CHECKING:``, which only mypy imports."""
    for node in ast.iter_child_nodes(tree):
        kept: list[ast.AST] = [node]
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            kept = list(node.orelse)
        for child in kept:
            yield child
            yield from _runtime_nodes(child)


def test_the_demo_lock_has_everything_the_proxy_and_the_sandbox_import() -> None:
    locked = set(read_lock(REQUIREMENTS / "sandbox.txt").pins)
    assert imported_distributions() <= locked


def _stand_ins(tmp_path: Path, uid: int) -> tuple[dict[str, str], Path, Path]:
    """A PATH with ``id`` saying ``uid`` and an ``apt-get`` that logs its arguments, and a
    Python without ensurepip (Debian's python3 without python3.X-venv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-get.log"
    scripts = {
        "id": f"echo {uid}",
        "apt-get": f'echo "$*" >> {shlex.quote(str(log))}',
        "python": f'case "$*" in *ensurepip*) exit 1 ;; esac\nexec {sys.executable} "$@"',
    }
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, bin_dir / "python", log


VENV_PACKAGE = "python{}.{}-venv".format(*sys.version_info[:2])


def test_a_python_without_ensurepip_gets_its_venv_package_as_root(tmp_path: Path) -> None:
    env, python, log = _stand_ins(tmp_path, uid=0)
    result = make("venv-support", f"PYTHON={python}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert calls[0] == "update -qq"
    assert calls[1].split() == ["install", "-y", "-qq", "--no-install-recommends", VENV_PACKAGE]


def test_a_python_without_ensurepip_gets_the_apt_line_otherwise(tmp_path: Path) -> None:
    env, python, log = _stand_ins(tmp_path, uid=1000)
    result = make("venv-support", f"PYTHON={python}", env=env)
    assert result.returncode != 0
    assert f"sudo apt-get install -y --no-install-recommends {VENV_PACKAGE}" in result.stdout
    assert not log.exists()


@pytest.mark.parametrize("uid", [0, 1000])
def test_a_python_with_ensurepip_needs_nothing(tmp_path: Path, uid: int) -> None:
    env, _, log = _stand_ins(tmp_path, uid)
    result = make("venv-support", f"PYTHON={sys.executable}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert not log.exists()
