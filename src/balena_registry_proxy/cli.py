"""Command line: ``balena-registry-proxy [flags]`` runs the proxy until SIGTERM or Ctrl-C.

The flags come from the settings table (``config.py``); the proxy runs through ``runtime.py``,
or as several processes through ``workers.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Sequence

from . import __version__, logs
from .config import AUTO_WORKERS, OPTIONS, ConfigError, load_settings, worker_count
from .resources import usable_cores
from .runtime import run, serve, wants_fast_loop
from .workers import metrics_folder, supervise

log = logging.getLogger("balena_registry_proxy")


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
    workers = worker_count(settings, usable_cores())
    folder = metrics_folder() if workers > 1 else None
    if folder is not None:
        try:
            return supervise(dataclasses.replace(settings, workers=workers), folder)
        except ConfigError as error:
            print(f"balena-registry-proxy: {error}", file=sys.stderr)
            return 2
    if workers > 1 and settings.workers != AUTO_WORKERS:
        print(
            f"balena-registry-proxy: WORKERS (--workers) {workers}: no writable folder for the "
            "workers' metrics (/dev/shm or TMPDIR): set WORKERS=1 or make one writable",
            file=sys.stderr,
        )
        return 2
    if workers > 1:
        log.warning(
            "one process instead of %d workers: no writable folder for their metrics "
            "(/dev/shm or TMPDIR)",
            workers,
        )
    settings = dataclasses.replace(settings, workers=1)
    return run(serve(settings), fast_loop=wants_fast_loop(settings))
