"""Running the proxy: one process's event loop, listening socket, signals and drain.

``serve`` runs the proxy until SIGTERM or SIGINT; ``run`` gives it an event loop (uvloop when
installed, unless a cache needs asyncio's sendfile). The command line (``cli.py``), the
pre-fork workers (``workers.py``) and the sandbox all start the proxy through here.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from . import logs
from .app import connection_limits, create_app, runner_options, token_verifier
from .config import ConfigError, Settings
from .resources import raise_open_file_limit
from .server import LoopErrors, ProxyRunner

log = logging.getLogger("balena_registry_proxy")
GC_THRESHOLD = 50_000
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


async def serve(
    settings: Settings, ready: Callable[[int], Coroutine[Any, Any, None]] | None = None
) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain in-flight requests and return.

    ``ready`` runs with the bound port once the proxy accepts connections, beside the serving;
    a signal cancels it if it is still running.
    """
    with logs.batched_on(asyncio.get_running_loop()):
        await _serve(settings, ready)


async def _serve(
    settings: Settings, ready: Callable[[int], Coroutine[Any, Any, None]] | None
) -> None:
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
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    # A worker starts with these blocked (workers.py): one sent before the handlers were in
    # place waited, and now stops the proxy the same graceful way.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
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
        try:
            # The handlers stay while in-flight requests finish: a second signal (a process
            # group's, or the supervisor passing on its own) must not cut the drain short.
            await runner.cleanup()
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)


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


def check(settings: Settings) -> None:
    """Raise ``ConfigError`` for what serving ``settings`` would refuse: the TLS files, the
    token key and the address (a cache folder is checked by the one process that opens it)."""
    tls_context(settings)
    token_verifier(settings)
    _check_address(settings)


def _check_address(settings: Settings) -> None:
    """Bind, and let go of, every address the proxy will listen on: the one error an
    operator should see, rather than one per worker.

    Without SO_REUSEPORT, although the workers will share the port with it: a port another
    proxy's workers listen on must be refused, not joined. Like the event loop, it skips
    address families this machine has no sockets for and keeps IPv6 sockets to IPv6.
    """
    try:
        addresses = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, protocol, _, address in addresses:
            try:
                trial = socket.socket(family, kind, protocol)
            except OSError:
                continue
            with trial:
                trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    trial.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                trial.bind(address)
    except OSError as error:
        raise ConfigError(bind_error(settings, error)) from None


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


def wants_fast_loop(settings: Settings) -> bool:
    """uvloop, unless a cache serves files: uvloop has no sendfile, asyncio's own loop has."""
    return not settings.caching


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
