"""Run a :class:`Sandbox` on its own event loop in a background thread.

Synchronous code (pytest session fixtures, scripts) gets a ready sandbox without sharing an event
loop with it, so tests may use any loop scope they like.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .environment import Sandbox
from .registry import S3Storage

__all__ = ["sandbox_in_thread"]


class _SandboxThread(threading.Thread):
    def __init__(
        self, start: Callable[[], contextlib.AbstractAsyncContextManager[Sandbox]]
    ) -> None:
        # Daemon: a wedged shutdown must not keep the interpreter alive forever.
        super().__init__(name="balena-sandbox", daemon=True)
        self._start = start
        self.ready: concurrent.futures.Future[Sandbox] = concurrent.futures.Future()
        self.failure: BaseException | None = None
        # A threading.Event can be set before the loop exists; stopping is never lost.
        self.stop_requested = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed over to the thread that owns the sandbox
            if self.ready.done():
                self.failure = exc
            else:
                self.ready.set_exception(exc)

    async def _main(self) -> None:
        async with self._start() as sandbox:
            self.ready.set_result(sandbox)
            await asyncio.to_thread(self.stop_requested.wait)


@contextlib.contextmanager
def sandbox_in_thread(
    catalog_path: Path | str | None = None,
    workdir: Path | str | None = None,
    *,
    timeout_seconds: float = 60.0,
    s3: S3Storage | None = None,
    registry_binary: Path | str | None = None,
    realm_host: str = "127.0.0.1",
) -> Iterator[Sandbox]:
    """Start a sandbox in a background thread, yield it once seeded, stop it on exit.

    ``s3``, ``registry_binary`` and ``realm_host`` are those of :meth:`Sandbox.start`. Startup
    errors (e.g. :class:`RegistryNotInstalledError`) are re-raised in the caller; so are errors
    during shutdown.
    """
    start = functools.partial(
        Sandbox.start,
        catalog_path,
        workdir,
        s3=s3,
        registry_binary=registry_binary,
        realm_host=realm_host,
    )
    thread = _SandboxThread(start)
    thread.start()
    try:
        sandbox = thread.ready.result(timeout=timeout_seconds)
    except BaseException:
        # Startup failed (the thread is ending) or is too slow: stop it once it is up.
        thread.stop_requested.set()
        thread.join(timeout_seconds)
        raise
    try:
        yield sandbox
    finally:
        thread.stop_requested.set()
        thread.join(timeout_seconds)
    if thread.failure is not None:
        raise thread.failure
