"""Log output: human-readable text by default, one JSON object per line for aggregators.

Every request writes an access line, so the path from a log call to standard error is on the
hot path of every request: records carry no thread or process facts the formats never print,
the time is formatted once per second, and lines written during one turn of the event loop
go out together at the end of that turn (in writes of whole lines of at most ``PIPE_BUF``
bytes) instead of one system call each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from .accesslog import ACCESS, AccessRecord

# Lines waiting for the end of the loop's turn are written at once beyond this size, so a
# burst of records (a long turn) holds little memory.
BATCH_BYTES = 64 * 1024
# At most this much per write: a pipe keeps a write of up to PIPE_BUF bytes whole, and the
# workers of one proxy share their standard error (Docker and Kubernetes read it from a pipe),
# so longer writes could cut one worker's lines into another's.
WRITE_BYTES = select.PIPE_BUF


def rfc3339(timestamp: float) -> str:
    """``timestamp`` as RFC 3339 in UTC with milliseconds: ``2026-12-03T08:11:22.649Z``."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _SecondCache:
    """The text of whole seconds, formatted once per second rather than once per record."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._second = -1
        self._text = ""

    def __call__(self, second: int) -> str:
        if second != self._second:
            self._second, self._text = second, self._render(second)
        return self._text


class TextFormatter(logging.Formatter):
    """``<local time> <LEVEL> <message>``, the time as ``2026-12-03 08:11:22,649``."""

    def __init__(self) -> None:
        """The proxy's text format."""
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._seconds = _SecondCache(
            lambda second: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's local time with milliseconds."""
        return f"{self._seconds(int(record.created))},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; access lines carry their fields as keys of their own."""

    def __init__(self) -> None:
        """The proxy's JSON format."""
        super().__init__()
        self._seconds = _SecondCache(lambda second: rfc3339(second)[:-5])

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        # The fraction rounded to microseconds first, as datetime does (see rfc3339).
        second = int(record.created)
        micro = round((record.created - second) * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        document: dict[str, Any] = {
            "time": f"{self._seconds(second)}.{micro // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, ACCESS, None)
        if isinstance(access, AccessRecord):
            document.update(access.fields())
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class BatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event-loop turn together.

    Records from the thread of the loop it is attached to (see :func:`batched_on`) wait for
    the end of the loop's turn; any other record is written at once. ``flush`` (also called
    by ``logging.shutdown`` at exit) writes whatever is waiting.
    """

    def __init__(self, stream: TextIO) -> None:
        """Write to ``stream``."""
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        self._scheduled = False
        # The loop is remembered, not asked for: on Python 3.11 asyncio.get_running_loop
        # makes a getpid system call, once per line.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch the records of ``loop``'s thread (None: none), after writing what waits."""
        self.acquire()
        try:
            self.flush()
            self._loop = loop
            self._thread = threading.get_ident() if loop is not None else 0
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted record; write it now if no loop runs or the batch is full."""
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        loop = self._loop
        if loop is None or threading.get_ident() != self._thread or self._size >= BATCH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                loop.call_soon(self.flush)
            except RuntimeError:  # the loop closed while attached
                self.flush()
            else:
                self._scheduled = True

    def flush(self) -> None:
        """Write every waiting line, in as few writes of whole lines as ``WRITE_BYTES`` allows."""
        self.acquire()
        try:
            self._scheduled = False
            lines, self._pending, self._size = self._pending, [], 0
            try:
                for chunk in _chunks(lines, WRITE_BYTES):
                    self.stream.write(chunk)
                    self.stream.flush()
            except Exception:
                # As StreamHandler does: a broken stderr must not take the proxy down.
                self.handleError(logging.makeLogRecord({"msg": "log write failed"}))
        finally:
            self.release()


def _chunks(lines: list[str], limit: int) -> Iterator[str]:
    """``lines`` joined into texts of at most ``limit`` bytes in UTF-8, each of whole lines (a
    longer line is a text of its own)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        # As standard error writes it: a surrogate (from bytes that were no UTF-8) escaped.
        length = len(line) if line.isascii() else len(line.encode(errors="backslashreplace"))
        if chunk and size + length > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


def configure(level: str, log_format: str) -> None:
    """Send every log record to standard error, as text or JSON."""
    # Facts no format prints, gathered for every record otherwise.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@contextlib.contextmanager
def batched_on(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While the block runs, lines logged on ``loop``'s thread go out once per loop turn."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BatchingHandler)]
    for handler in handlers:
        handler.attach(loop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.attach(None)
