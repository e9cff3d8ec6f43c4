"""HTTP/1.1 framing without sockets: answers fed as bytes, split at every boundary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.framing import (
    MAX_HEAD_BYTES,
    Broken,
    Data,
    End,
    Event,
    Framing,
    Head,
    ResponseReader,
    State,
    body_framing,
    keep_alive,
    request_head,
)


def read(method: str, *pieces: bytes, close: bool = False) -> list[Event]:
    """Every event of an answer fed in ``pieces``, adjacent data merged."""
    reader = ResponseReader(method)
    events: list[Event] = []
    for piece in pieces:
        events += reader.feed(piece)
    if close:
        events += reader.closed()
    return merged(events)


def merged(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].chunk + event.chunk)
        elif not (isinstance(event, Data) and not event.chunk):
            out.append(event)
    return out


def splits(raw: bytes) -> list[tuple[bytes, ...]]:
    """``raw`` whole, byte by byte, and cut in two at every boundary."""
    return [
        (raw,),
        tuple(raw[i : i + 1] for i in range(len(raw))),
        *((raw[:cut], raw[cut:]) for cut in range(1, len(raw))),
    ]


def head(status: int, framing: Framing, *headers: tuple[str, str], reason: str = "OK") -> Head:
    return Head(status, reason, list(headers), framing)


CL = ("Content-Length", "5")
CHUNKED = ("Transfer-Encoding", "chunked")

# (method, bytes on the wire, whether the connection closes after them, the events)
CASES: list[tuple[str, bytes, bool, list[Event]]] = [
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        [head(200, Framing.LENGTH, CL), Data(b"hello"), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        False,
        [head(200, Framing.LENGTH, ("Content-Length", "0")), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        False,
        [head(200, Framing.CHUNKED, CHUNKED), Data(b"hello world"), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
        True,
        [head(200, Framing.UNTIL_CLOSE, ("Connection", "close")), Data(b"all of it"), End(False)],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped",
        True,
        [
            head(200, Framing.UNTIL_CLOSE, ("Transfer-Encoding", "gzip")),
            Data(b"zipped"),
            End(False),
        ],
    ),
    (
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        False,
        [head(200, Framing.NONE, ("Content-Length", "1000")), End(True)],
    ),
    (
        "HEAD",
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\n\r\n",
        False,
        [head(307, Framing.NONE, ("Location", "/x"), reason="Temporary Redirect"), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        False,
        [head(204, Framing.NONE, reason="No Content"), End(True)],
    ),
    (
        "GET",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        False,
        [head(304, Framing.NONE, ("ETag", '"x"'), reason="Not Modified"), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        [head(200, Framing.LENGTH, CL), Data(b"hello"), End(True)],
    ),
    (
        "GET",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        [head(200, Framing.LENGTH, CL), Data(b"hello"), End(False)],
    ),
    (
        "GET",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
        False,
        [
            head(200, Framing.LENGTH, CL, ("Connection", "keep-alive")),
            Data(b"hello"),
            End(True),
        ],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        False,
        [head(200, Framing.LENGTH, CL, ("Connection", "close")), Data(b"hello"), End(False)],
    ),
    (
        "GET",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX: \xc3\xa9\r\n\r\n{}",
        False,
        [
            head(404, Framing.LENGTH, ("Content-Length", "2"), ("X", "é"), reason="Not Found"),
            Data(b"{}"),
            End(True),
        ],
    ),
]


@pytest.mark.parametrize(("method", "raw", "close", "expected"), CASES)
def test_every_framing_split_at_every_boundary(
    method: str, raw: bytes, close: bool, expected: list[Event]
) -> None:
    for pieces in splits(raw):
        assert read(method, *pieces, close=close) == expected, pieces


@pytest.mark.parametrize(
    ("method", "raw", "cause"),
    [
        # Bytes after a bodiless answer: an answer nobody asked for, or a desync.
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!", "bytes after the answer"),
        ("HEAD", b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "bytes after the answer"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "answer"),
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
            "",
        ),
        ("GET", b"SSH-2.0-OpenSSH\r\n\r\n", "malformed answer"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed answer"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "malformed"),
        ("GET", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed answer"),
        ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "upgrade"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
    ],
)
def test_what_cannot_be_trusted_breaks_the_stream(method: str, raw: bytes, cause: str) -> None:
    for pieces in splits(raw):
        reader = ResponseReader(method)
        events: list[Event] = []
        for piece in pieces:
            events += reader.feed(piece)
        broken = [event for event in events if isinstance(event, Broken)]
        ended = [event for event in events if isinstance(event, End)]
        # Either the stream broke, or the answer ended in a way that closes the connection.
        assert broken or ended == [End(reusable=False)], (pieces, events)
        assert all(cause in event.cause for event in broken), (pieces, events)
        assert reader.state in (State.BROKEN, State.DONE)


def test_more_bytes_than_the_length_end_the_answer_and_the_connection() -> None:
    reader = ResponseReader("GET")
    assert merged(reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")) == [
        head(200, Framing.LENGTH, CL)
    ]
    assert reader.feed(b"helloEXTRA") == [Data(b"hello"), End(reusable=False)]
    assert reader.feed(b"more") == [Broken("bytes after the answer")]


def test_bytes_while_idle_after_an_answer_break_it() -> None:
    reader = ResponseReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.state is State.DONE
    assert reader.feed(b"HTTP/1.1 200 OK\r\n") == [Broken("bytes after the answer")]
    assert reader.feed(b"ignored") == []
    assert reader.closed() == []


@pytest.mark.parametrize(
    ("raw", "events"),
    [
        (b"", [Broken("closed the connection before answering")]),
        (b"HTTP/1.1 200 OK\r\nContent-", [Broken("closed the connection before answering")]),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            [head(200, Framing.LENGTH, CL), Data(b"hel"), Broken("closed the connection mid-body")],
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            [
                head(200, Framing.CHUNKED, CHUNKED),
                Data(b"hel"),
                Broken("closed the connection mid-body"),
            ],
        ),
    ],
)
def test_a_close_before_the_end(raw: bytes, events: list[Event]) -> None:
    assert read("GET", raw, close=True) == events


def test_started_says_whether_any_byte_arrived() -> None:
    reader = ResponseReader("GET")
    assert not reader.started
    reader.feed(b"")
    assert not reader.started
    reader.feed(b"H")
    assert reader.started


def test_a_head_beyond_the_limit_breaks_the_stream() -> None:
    reader = ResponseReader("GET")
    events = reader.feed(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10))
    events += reader.feed(b"more")
    assert events == [Broken("the answer's head is too large")]
    many = ResponseReader("GET")
    line = b"X-Many: " + b"b" * 1000 + b"\r\n"
    events = many.feed(b"HTTP/1.1 200 OK\r\n" + line * 70 + b"\r\n")
    assert events == [Broken("the answer's head is too large")]


@pytest.mark.parametrize(
    ("method", "status", "headers", "framing"),
    [
        ("HEAD", 200, [("Content-Length", "9")], Framing.NONE),
        ("GET", 101, [], Framing.NONE),
        ("GET", 204, [("Content-Length", "9")], Framing.NONE),
        ("GET", 304, [], Framing.NONE),
        ("GET", 200, [("Content-Length", "9")], Framing.LENGTH),
        ("GET", 200, [("transfer-encoding", "gzip, Chunked")], Framing.CHUNKED),
        (
            "GET",
            200,
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip")],
            Framing.UNTIL_CLOSE,
        ),
        ("GET", 200, [("Transfer-Encoding", "chunked, gzip")], Framing.UNTIL_CLOSE),
        ("GET", 200, [], Framing.UNTIL_CLOSE),
        ("GET", 404, [("Transfer-Encoding", " ")], Framing.UNTIL_CLOSE),
        # Codings and methods that sort before "chunked" and after "HEAD"; the last 1xx.
        ("GET", 200, [("Transfer-Encoding", "br")], Framing.UNTIL_CLOSE),
        ("OPTIONS", 200, [("Content-Length", "9")], Framing.LENGTH),
        ("GET", 199, [], Framing.NONE),
    ],
)
def test_body_framing(
    method: str, status: int, headers: list[tuple[str, str]], framing: Framing
) -> None:
    assert body_framing(method, status, headers) is framing


@pytest.mark.parametrize(
    ("version", "headers", "framing", "expected"),
    [
        ("1.1", [], Framing.LENGTH, True),
        ("1.1", [("Connection", "Close")], Framing.LENGTH, False),
        ("1.1", [("Connection", "x, close")], Framing.CHUNKED, False),
        ("1.1", [], Framing.UNTIL_CLOSE, False),
        ("1.0", [], Framing.LENGTH, False),
        ("1.0", [("connection", "Keep-Alive")], Framing.NONE, True),
        ("1.0", [("Connection", "keep-alive")], Framing.UNTIL_CLOSE, False),
        # llhttp reads an HTTP/2.0 status line too: only 1.1 keeps alive unasked.
        ("2.0", [], Framing.LENGTH, False),
    ],
)
def test_keep_alive(
    version: str, headers: list[tuple[str, str]], framing: Framing, expected: bool
) -> None:
    assert keep_alive(version, headers, framing) is expected


def test_request_heads() -> None:
    assert request_head("GET", "/v2/", [("Accept", "a"), ("Accept", "b")], b"Host: h\r\n") == (
        b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAccept: a\r\nAccept: b\r\n\r\n"
    )
    assert request_head("HEAD", "/", [], b"Host: h\r\n") == b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", []),
        ("GET", "/a\r\nX: y", []),
        ("GET", "/", [("X-Evil", "a\r\nInjected: 1")]),
        ("GET", "/", [("X-Evil\nInjected", "1")]),
        ("GE T", "/", []),
        ("GET", "/", [("X", "a\rb")]),
    ],
)
def test_a_line_break_cannot_split_a_request(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError, match=r"^a request line or header would contain a line break$"):
        request_head(method, target, headers, b"Host: h\r\n")


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda name: name.lower() not in ("content-length", "transfer-encoding", "connection")
)
_VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ;=/", max_size=20).map(str.strip)


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, bytes, bool, list[Event]]:
    """An answer as bytes with the events it must give, and how it is cut into pieces."""
    method = draw(st.sampled_from(["GET", "HEAD"]))
    status = draw(st.sampled_from([200, 206, 301, 401, 404, 416, 500]))
    body = draw(st.binary(max_size=300))
    headers = draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=4))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    close = framing == "close"
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
        kind = Framing.LENGTH
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        step = draw(st.integers(1, 64))
        chunks = [body[i : i + step] for i in range(0, len(body), step)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        kind = Framing.CHUNKED
    else:
        headers.append(("Connection", "close"))
        payload = body
        kind = Framing.UNTIL_CLOSE
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    raw = f"HTTP/1.1 {status} Reason\r\n{lines}\r\n".encode()
    if method == "HEAD":
        expected: list[Event] = [Head(status, "Reason", headers, Framing.NONE)]
        expected.append(End(framing != "close"))
        return method, raw, False, expected
    expected = [Head(status, "Reason", headers, kind)]
    if body:
        expected.append(Data(body))
    expected.append(End(not close))
    return method, raw + payload, close, expected


@given(answers(), st.lists(st.integers(0, 2000), max_size=6))
def test_any_answer_cut_anywhere_reads_the_same(
    answer: tuple[str, bytes, bool, list[Event]], cuts: list[int]
) -> None:
    method, raw, close, expected = answer
    bounds = sorted({cut % (len(raw) + 1) for cut in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *bounds], [*bounds, len(raw)], strict=True)]
    assert read(method, *pieces, close=close) == expected


STATUS_LINE = b"HTTP/1.1 200 OK\r\n"


def long_header(size: int) -> bytes:
    """A header line whose name and value take ``size`` bytes together."""
    return b"X-Long: " + b"a" * (size - len(b"X-Long")) + b"\r\n"


def test_headers_may_take_64_kib_and_not_a_byte_more() -> None:
    ok = ResponseReader("HEAD").feed(STATUS_LINE + long_header(64 * 1024) + b"\r\n")
    assert [type(event) for event in ok] == [Head, End]
    too_large = ResponseReader("HEAD").feed(STATUS_LINE + long_header(64 * 1024 + 1) + b"\r\n")
    assert too_large == [Broken("the answer's head is too large")]


def test_a_head_still_unfinished_after_64_kib_breaks_at_the_next_bytes() -> None:
    # httptools holds an unfinished header line back, so the bytes fed are counted too.
    first = STATUS_LINE + b"X-Long: " + b"a" * (64 * 1024 - len(STATUS_LINE) - 8)
    assert len(first) == 64 * 1024
    reader = ResponseReader("HEAD")
    assert reader.feed(first) == []
    assert [type(event) for event in reader.feed(b"\r\n\r\n")] == [Head, End]
    beyond = ResponseReader("HEAD")
    assert beyond.feed(first + b"a") == []
    assert beyond.feed(b"a") == [Broken("the answer's head is too large")]


def test_an_answer_read_until_close_is_done_once_closed() -> None:
    reader = ResponseReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert reader.closed() == [End(reusable=False)]
    assert reader.state is State.DONE
    assert reader.closed() == []


def test_every_1xx_is_interim() -> None:
    raw = b"HTTP/1.1 199 Misc\r\nX-A: 1\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert read("GET", raw) == [head(200, Framing.LENGTH, ("Content-Length", "0")), End(True)]


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            "an upgrade nobody asked for",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
            "an answer nobody asked for",
        ),
    ],
)
def test_the_causes_of_a_break_are_said_exactly(raw: bytes, cause: str) -> None:
    assert read("GET", raw)[-1] == Broken(cause)


def test_a_malformed_answer_says_what_the_parser_found() -> None:
    (broken,) = read("GET", b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert isinstance(broken, Broken)
    assert broken.cause.startswith("malformed answer: ")
    assert len(broken.cause) > len("malformed answer: ")


def test_a_target_may_hold_any_character_but_space_and_line_breaks() -> None:
    # A storage host's signed URL, say.
    target = "/blobs/x?X-Amz-Signature=XYZ&X-Amz-Date=20260101T000000Z"
    assert request_head("GET", target, [], b"Host: s3\r\n").startswith(f"GET {target} ".encode())


def test_a_bodiless_answer_is_done_at_its_head() -> None:
    # The connection may be pooled, and its closing afterwards is no break.
    reader = ResponseReader("HEAD")
    events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert [type(event) for event in events] == [Head, End]
    assert reader.state is State.DONE
    assert reader.closed() == []
    # Body bytes in the same piece are bytes nobody asked for.
    with_body = ResponseReader("HEAD").feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert with_body[-1] == Broken("bytes after the answer")


def test_bytes_that_are_no_utf_8_are_read_as_they_came() -> None:
    raw = b"HTTP/1.1 200 \xe9t\xe9\r\nX-A: \xff\r\nContent-Length: 0\r\n\r\n"
    (answer_head, _) = read("GET", raw)
    assert isinstance(answer_head, Head)
    assert answer_head.reason == "\udce9t\udce9"
    assert answer_head.headers[0] == ("X-A", "\udcff")
