"""HTTP/1.1 requests written and answers read as bytes, without I/O: bytes in, events out.

Sans-IO, in the manner of h11: a ``ResponseReader`` is fed what a connection received and says
what it means (the head, body data, the end, or that the stream broke), and nothing else. The
rules that decide where an answer ends are pure functions (``body_framing``, ``keep_alive``);
a framing mistake would hand one request's bytes to the next, so every one of them is tested by
feeding bytes, split at every boundary. llhttp (through httptools) parses the head and chunked
bodies; a body of known length is passed through without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import httptools

# An answer's status line and headers may take this much; httptools itself sets no limit.
MAX_HEAD_BYTES = 64 * 1024
_CHARSET = ("utf-8", "surrogateescape")


class State(Enum):
    """Where a reader is in one answer."""

    HEAD = "head"
    """Waiting for, or reading, the status line and headers (interim 1xx answers included)."""
    BODY = "body"
    """Reading the body."""
    DONE = "done"
    """The answer ended; the ``End`` event said whether the connection may carry another."""
    BROKEN = "broken"
    """Malformed, or bytes nobody asked for: the connection must be closed."""


class Framing(Enum):
    """How an answer's body is delimited (RFC 9112, 6.3)."""

    NONE = "none"
    """No body: an answer to HEAD, a 1xx, 204 or 304."""
    LENGTH = "length"
    """Content-Length bytes."""
    CHUNKED = "chunked"
    """Chunked transfer coding, last."""
    UNTIL_CLOSE = "until-close"
    """Everything until the connection closes."""


@dataclass(frozen=True, slots=True)
class Head:
    """The status line and headers of the (final) answer."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    framing: Framing


@dataclass(frozen=True, slots=True)
class Data:
    """The next bytes of the body."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The answer ended; ``reusable``: the connection may carry the next request."""

    reusable: bool


@dataclass(frozen=True, slots=True)
class Broken:
    """The stream cannot be trusted any more; ``cause`` says why, in a few words."""

    cause: str


Event = Head | Data | End | Broken


def _tokens(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """The comma-separated tokens of every ``name`` header, lower case, in order."""
    return [
        token.strip().lower()
        for header, value in headers
        if header.lower() == name
        for token in value.split(",")
        if token.strip()
    ]


def body_framing(method: str, status: int, headers: Iterable[tuple[str, str]]) -> Framing:
    """How the body of an answer with ``status`` and ``headers`` to ``method`` is delimited."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Framing.NONE
    items = list(headers)
    codings = _tokens(items, "transfer-encoding")
    if codings:
        # A transfer coding other than chunked last ends only with the connection.
        return Framing.CHUNKED if codings[-1] == "chunked" else Framing.UNTIL_CLOSE
    if any(name.lower() == "content-length" for name, _ in items):
        return Framing.LENGTH
    return Framing.UNTIL_CLOSE


def keep_alive(version: str, headers: Iterable[tuple[str, str]], framing: Framing) -> bool:
    """Whether the connection may carry another request after this answer (HTTP/``version``)."""
    if framing is Framing.UNTIL_CLOSE:
        return False
    tokens = _tokens(headers, "connection")
    if "close" in tokens:
        return False
    return version == "1.1" or "keep-alive" in tokens


def request_head(
    method: str, target: str, headers: Iterable[tuple[str, str]], host_line: bytes
) -> bytes:
    """The head of a request without a body; ``ValueError`` where a CR or LF in any part
    would split it."""
    lines = [f"{name}: {value}" for name, value in headers]
    block = "\r\n".join(lines)
    if (
        block.count("\n") != max(0, len(lines) - 1)
        or block.count("\r") != max(0, len(lines) - 1)
        or any(c in target for c in " \r\n")
        or not method.isalpha()
    ):
        raise ValueError("a request line or header would contain a line break")
    head = f"{method} {target} HTTP/1.1\r\n".encode(*_CHARSET) + host_line
    if lines:
        head += block.encode(*_CHARSET) + b"\r\n"
    return head + b"\r\n"


class ResponseReader:
    """Reads the one answer to a request of ``method``; feed it bytes, act on its events."""

    def __init__(self, method: str) -> None:
        """A reader for the answer to a ``method`` request."""
        self.method = method
        self.state = State.HEAD
        self.started = False
        """Whether any byte of the answer arrived (a request it answered may have been acted
        on, so it is not sent again)."""
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._head_bytes = 0
        self._header_bytes = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._framing = Framing.NONE
        self._keep_alive = False
        self._remaining = 0
        self._messages = 0

    def feed(self, data: bytes | memoryview) -> list[Event]:
        """The events of what arrived next."""
        if not data or self.state is State.BROKEN:
            return []
        self.started = True
        if self.state is State.DONE:
            return self._break("bytes after the answer")
        if self.state is State.BODY and self._framing is Framing.LENGTH:
            return self._take_length(data)
        if self.state is State.HEAD:
            # Counted here as well as per header: httptools gathers a header line whole before
            # handing it over, however long it grows.
            if self._head_bytes > MAX_HEAD_BYTES:
                return self._break("the answer's head is too large")
            self._head_bytes += len(data)
        self._events = []
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._events.append(self._broken("an upgrade nobody asked for"))
        except httptools.HttpParserError as error:
            # A refusal of a callback here arrives as the context of the parser's error.
            refused = error.__cause__ or error.__context__
            text = refused.cause if isinstance(refused, _Refused) else f"malformed answer: {error}"
            self._events.append(self._broken(text))
        events, self._events = self._events, []
        if self.state in (State.DONE, State.BROKEN):
            # The parser and the reader point at each other; once the answer is over the
            # parser is not needed, and the cycle would wait for the garbage collector.
            self._parser = None
        return events

    def closed(self) -> list[Event]:
        """The events of the connection closing now."""
        if self.state is State.HEAD:
            return [self._broken("closed the connection before answering")]
        if self.state is State.BODY:
            if self._framing is Framing.UNTIL_CLOSE:
                self.state = State.DONE
                return [End(reusable=False)]
            return [self._broken("closed the connection mid-body")]
        return []

    def _take_length(self, data: bytes | memoryview) -> list[Event]:
        """Body bytes framed by Content-Length, passed through without the parser.

        Skipping it saves a copy and a callback for each chunk of a multi-GiB layer.
        """
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining -= len(data)
            return [Data(bytes(data))]
        self._remaining = 0
        self.state = State.DONE
        self._parser = None
        if len(data) == remaining:
            return [Data(bytes(data)), End(self._keep_alive)]
        # More than the answer: nothing a later request could trust.
        return [Data(bytes(data[:remaining])), End(reusable=False)]

    def _break(self, cause: str) -> list[Event]:
        return [self._broken(cause)]

    def _broken(self, cause: str) -> Broken:
        self.state = State.BROKEN
        self._parser = None
        return Broken(cause)

    # httptools callbacks, during feed_data.

    def on_message_begin(self) -> None:
        """An answer starts: only one was asked for."""
        self._messages += 1
        if self._messages > 1 or self.state is State.DONE:
            raise _Refused("an answer nobody asked for")

    def on_status(self, reason: bytes) -> None:
        """The reason phrase of the status line."""
        self._reason += reason.decode(*_CHARSET)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line; the lines of one answer together stay under the limit too."""
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEAD_BYTES:
            raise _Refused("the answer's head is too large")
        self._headers.append((name.decode(*_CHARSET), value.decode(*_CHARSET)))

    def on_headers_complete(self) -> None:
        """The head is whole: the answer's framing decides what follows."""
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status == 101:
            # An upgrade was never asked for: as malformed as any other surprise.
            raise _Refused("an upgrade nobody asked for")
        if status < 200:
            # An interim answer: its message ends here, the real one follows.
            self._headers, self._reason = [], ""
            self._messages -= 1
            return
        headers = self._headers
        self._framing = body_framing(self.method, status, headers)
        self._keep_alive = keep_alive(self._parser.get_http_version(), headers, self._framing)
        self._events.append(Head(status, self._reason, headers, self._framing))
        if self._framing is Framing.NONE:
            self.state = State.DONE
            self._events.append(End(self._keep_alive))
            return
        self.state = State.BODY
        if self._framing is Framing.LENGTH:
            # llhttp has checked the length: one, a number.
            self._remaining = next(
                int(value) for name, value in headers if name.lower() == "content-length"
            )

    def on_body(self, chunk: bytes) -> None:
        """Body bytes the parser framed; after a bodiless answer, bytes nobody asked for."""
        if self.state is not State.BODY:
            raise _Refused("bytes after the answer")
        if self._framing is Framing.LENGTH:
            self._remaining -= len(chunk)
        self._events.append(Data(chunk))

    def on_message_complete(self) -> None:
        """The parser found the answer's end."""
        if self.state is State.BODY:
            self._remaining = 0
            self.state = State.DONE
            self._events.append(End(self._keep_alive))


class _Refused(Exception):
    """Raised in a parser callback to stop parsing, with the reason for the ``Broken``."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause
