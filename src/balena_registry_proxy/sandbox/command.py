"""``balena-registry-proxy sandbox``: the local balenaCloud stand-in with the proxy in front."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import Settings
from ..runtime import run, serve
from .demo import banner, listings, pull_table
from .environment import Sandbox
from .ports import free_port
from .registry import RegistryNotInstalledError, find_registry_binary

DEFAULT_PORT = 8080


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the ``sandbox`` command."""
    parser = argparse.ArgumentParser(
        prog="balena-registry-proxy sandbox",
        description="Run a local stand-in for balenaCloud (the real Docker distribution "
        "registry with token auth, a token service with balena's rules, seeded releases) and "
        "the proxy in front of it, until Ctrl-C.",
    )
    parser.add_argument("--catalog", type=Path, help="catalog YAML/JSON (default: packaged)")
    parser.add_argument("--workdir", type=Path, help="keep registry data and keys here")
    parser.add_argument("--host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        help=f"proxy port (default {DEFAULT_PORT}, or any free port when that one is taken)",
    )
    parser.add_argument(
        "--alias-mode",
        action="store_true",
        help="run the proxy in alias mode (names resolved by the token service's aliases) "
        "instead of resolver mode",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="once up, list every app's tags and pull every selector through the proxy with "
        "skopeo, and show the results",
    )
    return parser


async def run_sandbox(args: argparse.Namespace) -> None:
    """Start the sandbox, serve the proxy in front of it, stop both on SIGINT/SIGTERM."""
    async with Sandbox.start(args.catalog, args.workdir) as sandbox:
        port = args.port if args.port is not None else free_port(args.host, DEFAULT_PORT)
        settings = Settings(
            host=args.host,
            port=port,
            registry_url=sandbox.registry_url,
            resolve=not args.alias_mode,
            api_url=sandbox.api_url,
        )

        async def show(port: int) -> None:
            host = f"[{args.host}]" if ":" in args.host else args.host
            proxy_host = f"{host}:{port}"
            resolving = not args.alias_mode
            print(banner(sandbox, proxy_host, resolving=resolving), flush=True)
            if args.demo:
                if resolving:
                    print("Listing the tags of every public app with skopeo ...", flush=True)
                    print(await listings(sandbox, proxy_host), flush=True)
                print("\nPulling every selector through the proxy with skopeo ...", flush=True)
                print(await pull_table(sandbox, proxy_host, resolving=resolving), flush=True)
                print("\nStill serving; Ctrl-C to stop.", flush=True)

        await serve(settings, ready=show)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``balena-registry-proxy sandbox``."""
    args = build_parser().parse_args(argv)
    try:
        find_registry_binary()
    except RegistryNotInstalledError as error:
        print(f"balena-registry-proxy sandbox: {error}", file=sys.stderr)
        return 1
    if args.demo and shutil.which("skopeo") is None:
        print(
            "balena-registry-proxy sandbox: skopeo not found; install it with: "
            "apt-get install skopeo",
            file=sys.stderr,
        )
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run(run_sandbox(args))
