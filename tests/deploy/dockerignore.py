"""What a ``.dockerignore`` leaves out of the build context, as Docker decides it.

Docker (moby's patternmatcher) cleans each pattern, drops a leading ``/``, matches with Go's
``filepath.Match`` plus ``**`` for any number of directories, excludes a directory's contents
with the directory, and lets a later ``!pattern`` take back what an earlier one excluded.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    """One line of .dockerignore: the pattern and whether it re-includes (``!``)."""

    pattern: str
    include: bool
    regex: re.Pattern[str]


def _translate(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.index("]", index + 1)
            body = pattern[index + 1 : end]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            index = end
        elif char == "\\" and index + 1 < len(pattern):
            index += 1
            out.append(re.escape(pattern[index]))
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out))


def read_rules(path: Path) -> list[Rule]:
    """The rules of the .dockerignore at ``path``, comments and blank lines dropped."""
    rules: list[Rule] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append(Rule(pattern, include, _translate(pattern)))
    return rules


def is_ignored(relative: str, rules: list[Rule]) -> bool:
    """Whether the context path ``relative`` (``a/b/c``) is left out of the build context."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.fullmatch(candidate) for candidate in candidates):
            ignored = not rule.include
    return ignored
