""".dockerignore keeps local state out of the build context and the sources in."""

from __future__ import annotations

from pathlib import Path

import pytest

from .dockerignore import is_ignored, read_rules
from .files import DOCKERIGNORE, ROOT


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "bench/results/run.json",
        ".tools/crane@v0.22.1/crane",
        "reports/conformance/proxy/junit.xml",
        "src/balena_registry_proxy.egg-info/PKG-INFO",
        "src/balena_registry_proxy/__pycache__/app.cpython-311.pyc",
        "build/lib/balena_registry_proxy/app.py",
        "dist/balena_registry_proxy-0.1.0-py3-none-any.whl",
    ],
)
def test_leaves_out(path: str) -> None:
    assert is_ignored(path, read_rules(DOCKERIGNORE))


def test_keeps_the_sources_and_their_data() -> None:
    rules = read_rules(DOCKERIGNORE)
    package = ROOT / "src" / "balena_registry_proxy"
    files = [
        path
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    assert files
    for path in [ROOT / "pyproject.toml", ROOT / "README.md", *files]:
        relative = str(path.relative_to(ROOT))
        assert not is_ignored(relative, rules), f"{relative} would be left out of the image"


@pytest.mark.parametrize(
    ("pattern", "path", "ignored"),
    [
        ("**/*.py[cod]", "src/a/b.pyc", True),
        ("**/*.py[cod]", "b.pyo", True),
        ("**/*.py[cod]", "src/a/b.py", False),
        ("bench/results", "bench/results/x/y.json", True),
        ("bench/results", "bench/run.py", False),
        ("/build", "build/x", True),
        ("*.md", "docs/x.md", False),
    ],
)
def test_matcher_follows_docker(tmp_path: Path, pattern: str, path: str, ignored: bool) -> None:
    file = tmp_path / ".dockerignore"
    file.write_text(f"# comment\n{pattern}\n", encoding="utf-8")
    assert is_ignored(path, read_rules(file)) is ignored


def test_matcher_lets_an_exception_take_back(tmp_path: Path) -> None:
    file = tmp_path / ".dockerignore"
    file.write_text("docs\n!docs/keep.md\n", encoding="utf-8")
    rules = read_rules(file)
    assert is_ignored("docs/other.md", rules)
    assert not is_ignored("docs/keep.md", rules)
