"""Run the sandbox until interrupted: ``python -m balena_registry_proxy.sandbox``.

Prints one JSON line with the endpoints on stdout once the registry is seeded, for demo scripts
to read, then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .environment import Sandbox


def describe(sandbox: Sandbox) -> dict[str, Any]:
    """The endpoints and the pinned release of every app, as printed on startup."""
    return {
        "registry_url": sandbox.registry_url,
        "token_url": sandbox.token_url,
        "service": sandbox.service,
        "issuer": sandbox.issuer,
        "workdir": str(sandbox.workdir),
        "apps": {
            app.slug: None if app.pinned_release is None else app.pinned_release.repository
            for app in sandbox.catalog.apps
        },
    }


async def _serve(catalog: Path | None, workdir: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Sandbox.start(catalog, workdir) as sandbox:
        print(json.dumps(describe(sandbox)), flush=True)
        print("sandbox running; interrupt to stop", file=sys.stderr, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and run the sandbox until a signal arrives."""
    parser = argparse.ArgumentParser(prog="python -m balena_registry_proxy.sandbox")
    parser.add_argument("--catalog", type=Path, help="catalog YAML/JSON (default: packaged)")
    parser.add_argument("--workdir", type=Path, help="keep registry data and keys here")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.catalog, args.workdir))


if __name__ == "__main__":
    main()
