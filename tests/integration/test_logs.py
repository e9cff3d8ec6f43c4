"""Log output: the formats, and lines written once per event-loop turn."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy import logs
from balena_registry_proxy.accesslog import ACCESS, AccessRecord

# Shared, so that the cache of the last second is exercised across examples.
TEXT = logs.TextFormatter()
JSON = logs.JsonFormatter()


class CountingStream(io.StringIO):
    """A text stream that counts its ``write`` calls and keeps their lengths in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.sizes: list[int] = []

    def write(self, text: str) -> int:
        self.writes += 1
        self.sizes.append(len(text.encode()))
        return super().write(text)


def record(message: str, created: float | None = None) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "t", "levelno": logging.INFO, "levelname": "INFO"})
    made.msg = message
    if created is not None:
        made.created = created
        made.msecs = int((created - int(created)) * 1000) + 0.0
    return made


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    with CountingStream() as counting:
        yield counting


def test_text_lines_keep_the_standard_time_format() -> None:
    standard = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    ours = logs.TextFormatter()
    for created in (1_764_750_682.649, 1_764_750_682.001, 1_764_750_683.999, 1_764_750_682.5):
        assert ours.format(record("x", created)) == standard.format(record("x", created))


def test_json_lines_carry_rfc3339_times_and_fields() -> None:
    formatter = logs.JsonFormatter()
    for created in (1_764_750_682.649, 1_764_750_682.0, 1_764_750_683.9996, 0.0005):
        entry = record("hello", created)
        access = AccessRecord.of(
            client="10.0.0.1",
            method="GET",
            target="/v2/",
            upstream_target=None,
            status=200,
            size=3,
            elapsed_ms=1.25,
            request_id="r1",
        )
        setattr(entry, ACCESS, access)
        document = json.loads(formatter.format(entry))
        assert document["time"] == logs.rfc3339(created)
        assert {key: document[key] for key in access.fields()} == access.fields()
        assert document["message"] == "hello"


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_cached_seconds_format_as_uncached_times_do(created: float) -> None:
    standard = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    assert TEXT.format(record("x", created)) == standard.format(record("x", created))
    assert json.loads(JSON.format(record("x", created)))["time"] == logs.rfc3339(created)


async def test_lines_of_one_loop_turn_are_written_together(stream: CountingStream) -> None:
    handler = logs.BatchingHandler(stream)
    handler.attach(asyncio.get_running_loop())
    for n in range(5):
        handler.handle(record(f"line {n}"))
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    assert stream.getvalue() == "".join(f"line {n}\n" for n in range(5))
    assert stream.writes == 1


async def test_a_full_batch_is_written_at_once(stream: CountingStream) -> None:
    handler = logs.BatchingHandler(stream)
    handler.attach(asyncio.get_running_loop())
    line = "x" * 1000
    for _ in range(logs.BATCH_BYTES // 1000 + 1):
        handler.handle(record(line))
    assert len(stream.getvalue()) >= logs.BATCH_BYTES


async def test_each_write_is_of_whole_lines_a_pipe_keeps_whole(stream: CountingStream) -> None:
    # Workers share standard error: a pipe keeps writes of up to PIPE_BUF bytes together.
    handler = logs.BatchingHandler(stream)
    handler.attach(asyncio.get_running_loop())
    lines = [f"{n} " + "é" * (n % 300) + "x" * (n % 97) for n in range(400)]
    for line in lines:
        handler.handle(record(line))
    await asyncio.sleep(0)
    assert stream.getvalue() == "".join(f"{line}\n" for line in lines)
    assert max(stream.sizes) <= logs.WRITE_BYTES
    assert stream.writes < len(lines) / 5, "lines are still batched"


@given(st.lists(st.text(max_size=3000), max_size=40), st.integers(1, 5000))
def test_chunks_keep_every_line_whole_and_in_order(lines: list[str], limit: int) -> None:
    chunks = list(logs._chunks(lines, limit))
    assert "".join(chunks) == "".join(lines)
    starts = {sum(len(line) for line in lines[:n]) for n in range(len(lines) + 1)}
    position = 0
    for chunk in chunks:
        assert position in starts  # every chunk begins where a line does
        position += len(chunk)
        # Over the limit only as one line on its own.
        assert len(chunk.encode()) <= limit or chunk in lines


def test_a_line_of_bytes_that_were_no_utf8_is_written_escaped() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, errors="backslashreplace", write_through=True)
    handler = logs.BatchingHandler(stream)
    for line in ("first", "bad \udcff", "third"):
        handler.handle(record(line))
    assert raw.getvalue() == b"first\nbad \\udcff\nthird\n"


def test_a_handler_left_on_a_closed_loop_writes_at_once(stream: CountingStream) -> None:
    loop = asyncio.new_event_loop()
    handler = logs.BatchingHandler(stream)
    handler.attach(loop)
    loop.close()
    handler.handle(record("late"))
    assert stream.getvalue() == "late\n"


async def test_other_threads_write_at_once(stream: CountingStream) -> None:
    handler = logs.BatchingHandler(stream)
    handler.attach(asyncio.get_running_loop())
    await asyncio.to_thread(handler.handle, record("from a thread"))
    assert stream.getvalue() == "from a thread\n"


def test_without_a_loop_lines_are_written_at_once(stream: CountingStream) -> None:
    handler = logs.BatchingHandler(stream)
    handler.handle(record("alone"))
    assert stream.getvalue() == "alone\n"


def test_leaving_the_loop_writes_what_waits(stream: CountingStream) -> None:
    root = logging.getLogger()
    handler = logs.BatchingHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    root.addHandler(handler)

    async def log_and_leave() -> None:
        stream.seek(0)
        stream.truncate()
        with logs.batched_on(asyncio.get_running_loop()):
            handler.handle(record("last words"))
            assert stream.getvalue() == ""

    try:
        asyncio.run(log_and_leave())
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().endswith(" INFO last words\n")
    # Detached: the next line does not wait for a loop that is gone.
    handler.handle(record("after"))
    assert stream.getvalue().endswith(" INFO after\n")


def test_a_broken_stream_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("gone")

    complaints: list[str] = []
    handler = logs.BatchingHandler(Broken())
    monkeypatch.setattr(handler, "handleError", lambda entry: complaints.append(entry.msg))
    handler.handle(record("lost"))
    assert complaints == ["log write failed"]


def test_configure_installs_one_batching_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("WARNING", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0], logs.BatchingHandler)
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True


def test_the_second_cache_follows_the_clock() -> None:
    formatter = logs.TextFormatter()
    now = time.time()
    first = formatter.format(record("a", now))
    later = formatter.format(record("b", now + 2))
    assert first[:19] != later[:19]
    assert later == logging.Formatter("%(asctime)s %(levelname)s %(message)s").format(
        record("b", now + 2)
    )
