"""Command line: ``balena-registry-proxy [flags]`` runs the proxy until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import gc
import logging
import multiprocessing
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing import connection
from typing import Any

from aiohttp import web

from . import __version__, logs
from .app import connection_limits, create_app, runner_options
from .config import OPTIONS, ConfigError, Settings, load_settings
from .resources import raise_open_file_limit
from .server import LoopErrors, ProxyRunner

log = logging.getLogger("balena_registry_proxy")
GC_THRESHOLD = 50_000


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every setting's flag, each also readable from the environment."""
    parser = argparse.ArgumentParser(
        prog="balena-registry-proxy",
        description="Pull balenaCloud release images by app slug: <org>/<app>/<commit|semver>.",
        epilog="Every flag can also be set by the environment variable shown; flags win. "
        "'balena-registry-proxy sandbox --help' describes the local balenaCloud stand-in.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    for option in OPTIONS:
        default = f", default {option.shown_default}" if option.shown_default else ""
        text = f"{_plain(option.help)} [{option.env}{default}]"
        if option.switch:
            # Alone it means on; "--flag=false" and "--no-flag" mean off.
            parser.add_argument(
                option.flag, dest=option.field, nargs="?", const="true", metavar="BOOL", help=text
            )
            parser.add_argument(
                option.negative_flag,
                dest=option.field,
                action="store_const",
                const="false",
                help=argparse.SUPPRESS,
            )
        else:
            parser.add_argument(option.flag, dest=option.field, help=text)
    return parser


def _plain(markdown: str) -> str:
    """Help text without the README's markup: code spans and links read as plain text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown).replace("`", "")
    # argparse formats help with %-style placeholders.
    return text.replace("%", "%%")


async def serve(
    settings: Settings, ready: Callable[[int], Coroutine[Any, Any, None]] | None = None
) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain in-flight requests and return.

    ``ready`` runs with the bound port once the proxy accepts connections, beside the serving;
    a signal cancels it if it is still running.
    """
    ssl_context = tls_context(settings)
    asyncio.get_running_loop().set_exception_handler(LoopErrors())
    limits = connection_limits(settings, raise_open_file_limit())
    runner = ProxyRunner(create_app(settings), limits=limits, **runner_options(settings))
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.host,
        settings.port,
        reuse_address=True,
        # Several worker processes share the port; the kernel spreads connections over them.
        reuse_port=settings.workers > 1,
        ssl_context=ssl_context,
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(bind_error(settings, error)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = _bound_port(runner, settings.port)
    log.info("listening on %s:%d, upstream %s", settings.host, port, settings.registry_url)
    ready_task = asyncio.create_task(ready(port)) if ready is not None else None
    try:
        await stop.wait()
        log.info(
            "shutting down: finishing in-flight requests (up to %gs)", settings.shutdown_timeout
        )
    finally:
        if ready_task is not None:
            ready_task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def bind_error(settings: Settings, error: OSError) -> str:
    """The start-up line for a failed listen, naming the setting that is to blame."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        # The address is no name that resolves, or none of this machine's.
        reason = error.strerror or str(error)
        return f"PROXY_HOST (--host) {settings.host!r}: cannot listen on {where}: {reason}"
    reason = os.strerror(error.errno) if error.errno else str(error)
    return f"PROXY_PORT (--port) {settings.port}: cannot listen on {where}: {reason}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context for ``TLS_CERT``/``TLS_KEY``, or None to serve plain HTTP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # An encrypted key would make OpenSSL prompt on the terminal: fail instead.
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"TLS_CERT (--tls-cert) / TLS_KEY (--tls-key): cannot load "
            f"{settings.tls_cert!r} with {settings.tls_key!r}: {error.strerror or error}"
        ) from None
    return context


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
    """Entry point of the ``balena-registry-proxy`` command (``sandbox`` runs the sandbox)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["sandbox"]:
        # Imported only here: the proxy itself needs none of the sandbox's dependencies.
        from .sandbox.command import main as sandbox_main

        return sandbox_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
        settings = load_settings(os.environ, vars(args))
    except ConfigError as error:
        print(f"balena-registry-proxy: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return supervise(settings)
    return run(serve(settings), fast_loop=wants_fast_loop(settings))


def wants_fast_loop(settings: Settings) -> bool:
    """uvloop, unless a cache serves files: uvloop has no sendfile, asyncio's own loop has."""
    return settings.cache_dir is None


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` proxy processes on one port until SIGTERM/SIGINT.

    Each worker is a whole proxy (its own event loop, upstream pool and metrics); the parent
    only starts them, passes signals on, and exits 0 once all have drained and exited 0. A
    worker that dies stops the others: half a proxy is worse than a clear failure.
    """
    # What every worker would refuse, refuse once, here.
    tls_context(settings)
    create_app(settings)
    context = multiprocessing.get_context("fork")
    # Each worker says on its pipe when it listens: only then has the proxy started.
    pipes = [context.Pipe(duplex=False) for _ in range(settings.workers)]
    workers = [
        context.Process(target=_worker, args=(settings, sender), name=f"worker-{n}", daemon=False)
        for n, (_, sender) in enumerate(pipes)
    ]
    listening = {receiver: worker for (receiver, _), worker in zip(pipes, workers, strict=True)}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    # A signal between the forks and the handlers would kill the parent and orphan workers.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for worker in workers:
            worker.start()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for _, sender in pipes:
        sender.close()
    running = {worker.sentinel: worker for worker in workers}
    codes = []
    while running:
        for ready in connection.wait([*running, *listening]):
            if isinstance(ready, connection.Connection):
                listening.pop(ready)
                try:
                    ready.recv()
                except EOFError:
                    continue  # it died before listening: its exit is handled below
                if not listening:
                    log.info("started %d workers on port %d", len(workers), settings.port)
                continue
            assert isinstance(ready, int)
            worker = running.pop(ready)
            worker.join()
            codes.append(worker.exitcode)
            if worker.exitcode != 0 and not stopping:
                log.error(
                    "%s (pid %s) exited with %s: stopping", worker.name, worker.pid, worker.exitcode
                )
                stop(signal.SIGTERM, None)
    if all(code == 0 for code in codes):
        return 0
    return 2 if 2 in codes else 1


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker(settings: Settings, listening: connection.Connection) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent()

    async def report(port: int) -> None:
        listening.send(port)
        listening.close()

    sys.exit(run(serve(settings, ready=report)))


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, so no worker outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the parent's SIGTERM handling is all there is
    if os.getppid() == 1:
        sys.exit(0)  # the parent died before we could ask


_PR_SET_PDEATHSIG = 1


def run(main_coroutine: Coroutine[Any, Any, None], *, fast_loop: bool = True) -> int:
    """Run ``main_coroutine``, on uvloop if ``fast_loop`` and installed; 2 on ConfigError."""
    # Every request allocates many short-lived objects and almost no cycles: collecting the
    # youngest generation every 700 allocations cost about a tenth of a manifest request's CPU.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    try:
        factory = _event_loop_factory() if fast_loop else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main_coroutine)
    except ConfigError as error:
        print(f"balena-registry-proxy: {error}", file=sys.stderr)
        return 2
    return 0
