"""go-tools.txt pins each Go program the way ``make go-tools`` installs it."""

from __future__ import annotations

import re

import pytest

from .go_tools import PINS, read_pins


def test_every_tool_is_pinned_and_named_after_its_binary() -> None:
    tools = read_pins(PINS.read_text())
    names = {"conformance", "crane", "oras", "ctr", "containerd", "registry", "weed", "kustomize"}
    assert names <= set(tools)
    for name, tool in tools.items():
        # go install names a binary after the last element of the package path, but for a
        # major version suffix (sigs.k8s.io/kustomize/kustomize/v5 builds kustomize).
        assert re.sub(r"/v[2-9][0-9]*$", "", tool.package).rsplit("/", 1)[-1] == name, tool
        assert tool.path.parent.name == f"{name}@{tool.version}"


@pytest.mark.parametrize(
    "line",
    [
        "crane github.com/google/go-containerregistry/cmd/crane@latest",
        "crane github.com/google/go-containerregistry/cmd/crane@main",
        "crane github.com/google/go-containerregistry/cmd/crane",
    ],
)
def test_an_unpinned_tool_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="not pinned"):
        read_pins(line)


def test_a_module_that_is_not_the_packages_is_refused() -> None:
    line = (
        "weed github.com/seaweedfs/seaweedfs/weed@v0.0.0-20261109003541-7506e5f91cd6 example.com/x"
    )
    with pytest.raises(ValueError, match="module"):
        read_pins(line)
