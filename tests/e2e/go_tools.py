"""The pinned Go programs of ``go-tools.txt``, as ``make go-tools`` builds them.

A tool is looked up at the path its pin gives, ``.tools/<name>@<version>/<name>``, so the binary
a test runs is always the version the pin names: changing a pin without rebuilding makes the
test skip (fail under ``REQUIRE_E2E=1``) instead of testing a stale build.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..conftest import missing

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "go-tools.txt"
TOOLS_DIR = ROOT / ".tools"
BUILD_COMMAND = "make go-tools"


@dataclass(frozen=True)
class GoTool:
    """One pinned Go program."""

    name: str
    package: str
    version: str

    @property
    def path(self) -> Path:
        """Where ``make go-tools`` installs this version."""
        return TOOLS_DIR / f"{self.name}@{self.version}" / self.name


def read_pins(text: str) -> dict[str, GoTool]:
    """The tools of a ``go-tools.txt``: ``<name> <package>@<version> [<module>]`` lines (the
    module where the package is built inside its module's source), ``#`` comments."""
    tools: dict[str, GoTool] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, pinned, *module = line.split()
        package, _, version = pinned.rpartition("@")
        if not (package and re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", version)):
            raise ValueError(f"{PINS.name}: {name} is not pinned to a version: {pinned}")
        if len(module) > 1 or (module and not package.startswith(module[0] + "/")):
            raise ValueError(f"{PINS.name}: {name}'s module is not its package's: {line}")
        tools[name] = GoTool(name, package, version)
    return tools


def pin(name: str) -> GoTool:
    """The pin of tool ``name``."""
    return read_pins(PINS.read_text())[name]


def go_tool(name: str) -> Path:
    """The built binary of tool ``name``, else ``missing`` with the command that builds it."""
    tool = pin(name)
    if not os.access(tool.path, os.X_OK):
        missing(f"{name} {tool.version} is not built; build it with: {BUILD_COMMAND}")
    return tool.path
