"""Command line: ``balena-registry-proxy [flags]`` runs the proxy until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from . import __version__
from .app import create_app, runner_options
from .config import OPTIONS, ConfigError, Settings, load_settings

log = logging.getLogger("balena_registry_proxy")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every setting's flag, each also readable from the environment."""
    parser = argparse.ArgumentParser(
        prog="balena-registry-proxy",
        description="Pull balenaCloud release images by app slug: <org>/<app>/<commit|semver>.",
        epilog="Every flag can also be set by the environment variable shown; flags win.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    for option in OPTIONS:
        parser.add_argument(option.flag, dest=option.field, help=f"{option.help} [{option.env}]")
    return parser


async def serve(settings: Settings, ready: Callable[[int], None] | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain in-flight requests and return.

    ``ready`` is called with the bound port once the proxy accepts connections.
    """
    runner = web.AppRunner(create_app(settings), **runner_options(settings))
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.host,
        settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        reuse_address=True,
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(
            f"PROXY_PORT (--port) {settings.port}: cannot listen on "
            f"{settings.host}:{settings.port}: {error.strerror}"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = _bound_port(runner, settings.port)
    log.info("listening on %s:%d, upstream %s", settings.host, port, settings.registry_url)
    if ready is not None:
        ready(port)
    try:
        await stop.wait()
        log.info(
            "shutting down: finishing in-flight requests (up to %gs)", settings.shutdown_timeout
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed: the same code, a faster event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``balena-registry-proxy`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(os.environ, vars(args))
    except ConfigError as error:
        print(f"balena-registry-proxy: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve(settings))
    except ConfigError as error:
        print(f"balena-registry-proxy: {error}", file=sys.stderr)
        return 2
    return 0
