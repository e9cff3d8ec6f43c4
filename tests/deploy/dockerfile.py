"""The Dockerfile, parsed by dockerfile-parse into typed stages and instructions."""

from __future__ import annotations

import json
import posixpath
import shlex
from dataclasses import dataclass
from pathlib import Path

from dockerfile_parse import DockerfileParser


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), its text with continuations joined, its line."""

    keyword: str
    value: str
    line: int


@dataclass(frozen=True)
class Stage:
    """One build stage: ``FROM <image> [AS <name>]`` and the instructions up to the next FROM."""

    image: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        """The stage's instructions with ``keyword``, in order."""
        return [item for item in self.instructions if item.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        """The stage's last ``keyword`` instruction (the one in effect), if any."""
        found = self.all(keyword)
        return found[-1] if found else None


def parse(path: Path) -> list[Stage]:
    """The build stages of the Dockerfile at ``path``, in order."""
    parser = DockerfileParser(path=str(path))
    stages: list[Stage] = []
    image = ""
    name: str | None = None
    instructions: list[Instruction] = []
    started = False
    for item in parser.structure:
        keyword = str(item["instruction"]).upper()
        if keyword == "COMMENT":
            continue
        value = str(item["value"])
        if keyword == "FROM":
            if started:
                stages.append(Stage(image, name, tuple(instructions)))
            words = value.split()
            words = [word for word in words if not word.startswith("--platform=")]
            image = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            instructions = []
            started = True
            continue
        assert started, f"{path.name}:{int(item['startline']) + 1}: {keyword} before any FROM"
        instructions.append(Instruction(keyword, value, int(item["startline"]) + 1))
    if started:
        stages.append(Stage(image, name, tuple(instructions)))
    return stages


def exec_form(value: str) -> list[str] | None:
    """The argument list of an exec-form (JSON array) value, or None for the shell form."""
    if not value.lstrip().startswith("["):
        return None
    parsed = json.loads(value)
    assert isinstance(parsed, list), value
    assert all(isinstance(word, str) for word in parsed), value
    return [str(word) for word in parsed]


@dataclass(frozen=True)
class Healthcheck:
    """``HEALTHCHECK [--option=value ...] CMD ...``."""

    options: dict[str, str]
    command: list[str] | None  # exec form; None for the shell form
    shell: str | None  # shell form


def healthcheck(value: str) -> Healthcheck:
    """Parse the value of a HEALTHCHECK instruction (not ``NONE``)."""
    head, separator, command = value.partition("CMD")
    assert separator, f"HEALTHCHECK without CMD: {value!r}"
    options: dict[str, str] = {}
    for word in shlex.split(head):
        key, _, option = word.partition("=")
        options[key.removeprefix("--")] = option
    arguments = exec_form(command)
    return Healthcheck(options, arguments, None if arguments is not None else command.strip())


def env_instruction(value: str) -> dict[str, str]:
    """The variables an ``ENV`` instruction sets (``ENV k=v k2="v 2"``, or legacy ``ENV k v``)."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: value.split(None, 1)[1] if len(words) > 1 else ""}
    return dict(word.split("=", 1) for word in words)


def shell_commands(value: str) -> list[list[str]]:
    """The simple commands of a shell-form value, split at ``&&``, ``||`` and ``;``."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(value, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for word in lexer:
        if word in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def workdir(stage: Stage) -> str:
    """The stage's working directory (its last WORKDIR; ``/`` without one)."""
    item = stage.last("WORKDIR")
    return item.value.strip() if item is not None else "/"


def copied_from_context(stage: Stage) -> dict[str, str]:
    """Where the stage's COPY instructions put files of the build context: the absolute path in
    the image of each copied file, mapped to its path in the context."""
    placed: dict[str, str] = {}
    for item in stage.all("COPY"):
        words = item.value.split()
        if any(word.startswith("--from=") for word in words):
            continue
        *sources, destination = [word for word in words if not word.startswith("--")]
        target = posixpath.join(workdir(stage), destination)
        for source in sources:
            into_folder = destination.endswith("/") or len(sources) > 1
            path = posixpath.join(target, posixpath.basename(source)) if into_folder else target
            placed[posixpath.normpath(path)] = posixpath.normpath(source)
    return placed
