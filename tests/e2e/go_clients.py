"""The Go clients that write OCI layouts, crane and oras, as the tests drive them.

Each has a home folder of its own (no credentials but those a test logs in with) and talks
plain HTTP to a proxy; ``pulled`` is what both do alike: fetch an image, every blob checked,
into a layout on disk, and say which digest it wrote down for it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .clients import OciLayout, client_env, run_client, write_auth_config


class LayoutClient(Protocol):
    """What crane and oras both do."""

    def pulled(
        self, name: str, destination: Path, credentials: str | None = None
    ) -> tuple[str, set[str]]:
        """Fetch ``name`` into an OCI layout: the digest written down for it, the blobs there."""


@dataclass(frozen=True)
class Crane:
    """crane with a home of its own, talking plain HTTP to a proxy."""

    binary: Path
    host: str
    home: Path

    def run(self, *args: str, credentials: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a crane command, logged in with ``user:password`` if given."""
        config = self.home / ("login" if credentials else "anonymous")
        config.mkdir(exist_ok=True)
        if credentials:
            write_auth_config(config / "config.json", self.host, credentials)
        env = client_env(HOME=str(self.home), DOCKER_CONFIG=str(config))
        return run_client([str(self.binary), *args, "--insecure"], env)

    def ref(self, name: str) -> str:
        """``name`` on the proxy."""
        return f"{self.host}/{name}"

    def pull(
        self, name: str, destination: Path, *options: str, credentials: str | None = None
    ) -> OciLayout:
        """``crane pull`` of ``name`` into an OCI layout; fails the test if crane fails."""
        source = self.ref(name)
        result = self.run(
            "pull", "--format=oci", *options, source, str(destination), credentials=credentials
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        return OciLayout(destination)

    def pulled(
        self, name: str, destination: Path, credentials: str | None = None
    ) -> tuple[str, set[str]]:
        """Pull ``name`` into a layout: the digest crane wrote down, and the blobs there."""
        layout = self.pull(name, destination, credentials=credentials)
        return layout.only(), layout.blobs()


@dataclass(frozen=True)
class Oras:
    """oras with a home of its own, talking plain HTTP to a proxy."""

    binary: Path
    host: str
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an oras command."""
        return run_client([str(self.binary), *args], client_env(HOME=str(self.home)))

    def ref(self, name: str) -> str:
        """``name`` on the proxy; oras wants a tag or a digest spelled out."""
        return f"{self.host}/{name}" if ":" in name or "@" in name else f"{self.host}/{name}:latest"

    def login(self, credentials: str | None) -> list[str]:
        """The authentication file option of a command: ``user:password``, or nobody's."""
        path = self.home / ("login.json" if credentials else "anonymous.json")
        if credentials:
            write_auth_config(path, self.host, credentials)
        else:
            path.write_text("{}")
        return [f"--registry-config={path}"]

    def copy(self, name: str, layout: Path, credentials: str | None = None) -> OciLayout:
        """``oras copy`` of ``name`` into the OCI layout ``layout``, tagged ``copied``."""
        login = [f"--from-{option[2:]}" for option in self.login(credentials)]
        source, destination = self.ref(name), f"{layout}:copied"
        result = self.run(
            "copy", "--from-plain-http", *login, source, "--to-oci-layout", destination
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        return OciLayout(layout)

    def pulled(
        self, name: str, destination: Path, credentials: str | None = None
    ) -> tuple[str, set[str]]:
        """Copy ``name`` into a layout: the digest oras tagged there, and the blobs there."""
        layout = self.copy(name, destination, credentials)
        return layout.tagged("copied"), layout.blobs()

    def manifest(self, name: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``oras manifest fetch`` of ``name``."""
        return self.run("manifest", "fetch", "--plain-http", *options, self.ref(name))
