"""Several proxy processes on one port (``--workers N``): forked, watched, stopped together.

Each worker is a whole proxy (its own event loop, upstream pool and caches) listening with
SO_REUSEPORT; the parent only starts them, passes signals on, and exits 0 once all have drained
and exited 0. A worker that dies stops the others: half a proxy is worse than a clear failure.
The workers count their metrics in files of one temporary folder, so that ``/metrics``, from
whichever worker answers, adds up the whole server (see ``metrics.py``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
from multiprocessing import connection

from . import metrics
from .config import Settings
from .runtime import STOP_SIGNALS, check, run, serve

log = logging.getLogger("balena_registry_proxy")
_PR_SET_PDEATHSIG = 1
# mkdtemp makes a private folder (mode 0700) with a random name in it.
_SHARED_MEMORY = "/dev/shm"  # noqa: S108


def supervise(settings: Settings, folder: str) -> int:
    """Run ``settings.workers`` proxy processes on one port until SIGTERM/SIGINT, counting
    their metrics in ``folder`` (see :func:`metrics_folder`; removed at the end).

    Each worker is a whole proxy (its own event loop, upstream pool and caches); the parent
    only starts them, passes signals on, and exits 0 once all have drained and exited 0. A
    worker that ends unasked stops the others: half a proxy is worse than a clear failure.
    """
    try:
        # What every worker would refuse, refuse once, here.
        check(settings)
        if settings.resolve and settings.token_seal_key is None:
            # One key for all workers: a token one of them sealed must open in the others.
            settings = dataclasses.replace(settings, token_seal_key=secrets.token_urlsafe(32))
        return _supervise(settings, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def metrics_folder() -> str | None:
    """A new folder for the workers' metrics files, in memory where there is a tmpfs (the
    container images run on a read-only root file system); None if nothing is writable."""
    for parent in (_SHARED_MEMORY, None):
        try:
            return tempfile.mkdtemp(prefix="balena-registry-proxy-metrics-", dir=parent)
        except OSError:
            continue
    return None


def _supervise(settings: Settings, folder: str) -> int:
    context = multiprocessing.get_context("fork")
    # Each worker says on its pipe when it listens: only then has the proxy started.
    pipes = [context.Pipe(duplex=False) for _ in range(settings.workers)]
    workers = [
        context.Process(
            target=_worker,
            args=(settings, sender, folder, os.getpid()),
            name=f"worker-{n}",
            daemon=False,
        )
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
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for worker in workers:
            worker.start()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for _, sender in pipes:
        sender.close()
    running = {worker.sentinel: worker for worker in workers}
    codes: list[int | None] = []
    unexpected = False
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
            if worker.pid is not None:
                metrics.process_gone(worker.pid, folder)
            codes.append(worker.exitcode)
            if not stopping:
                # Even with 0: a worker only ends when told to, so the proxy is short of one.
                unexpected = True
                log.error(
                    "%s (pid %s) exited with %s: stopping", worker.name, worker.pid, worker.exitcode
                )
                stop(signal.SIGTERM, None)
    if all(code == 0 for code in codes) and not unexpected:
        return 0
    return 2 if 2 in codes else 1


def _worker(settings: Settings, listening: connection.Connection, folder: str, parent: int) -> None:
    # SIGTERM and SIGINT stay blocked (as the parent forked) until serve() has its handlers:
    # one that arrives while the worker starts then stops it gracefully, not half-started.
    _die_with(parent)
    metrics.count_in_folder(folder)

    async def report(port: int) -> None:
        listening.send(port)
        listening.close()

    sys.exit(run(serve(settings, ready=report)))


def _die_with(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent (pid ``parent``) dies, so no
    worker outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the parent's SIGTERM handling is all there is
    # Compared with the parent's pid, not with 1: in a container the parent is pid 1.
    if os.getppid() != parent:
        sys.exit(0)  # the parent died before we could ask
