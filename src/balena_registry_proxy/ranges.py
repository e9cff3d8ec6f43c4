"""The ``Range`` of a blob request, for answers the proxy gives from its own copy.

Pure functions, no I/O. Clients resume a cut layer with one byte range; that is the form
answered here. Like the registry, a range that is malformed or lies outside the blob is
unsatisfiable (416). Several ranges in one request are no client's habit; such a request gets
the whole blob, as RFC 9110 lets a server choose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SINGLE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``first`` to ``last`` inclusive of a blob of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        """How many bytes the range holds."""
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` of a 206 answer."""
        return f"bytes {self.first}-{self.last}/{self.size}"


class Unsatisfiable:
    """A range the blob cannot serve; the answer is 416 with ``bytes */<size>``."""

    __slots__ = ()


UNSATISFIABLE = Unsatisfiable()


def requested_range(header: str | None, size: int) -> ByteRange | Unsatisfiable | None:
    """What ``Range: header`` asks of a blob of ``size`` bytes; None for the whole blob."""
    if header is None:
        return None
    text = header.strip()
    if "," in text:
        return None
    match = _SINGLE.fullmatch(text)
    if match is None or match.group(1) == match.group(2) == "":
        return UNSATISFIABLE
    first_text, last_text = match.groups()
    if first_text == "":
        # A suffix: the last N bytes.
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = int(first_text)
    last = size - 1 if last_text == "" else min(int(last_text), size - 1)
    if first >= size or (last_text != "" and int(last_text) < first):
        return UNSATISFIABLE
    return ByteRange(first, last, size)


def unsatisfiable_content_range(size: int) -> str:
    """The ``Content-Range`` of a 416 answer."""
    return f"bytes */{size}"


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """What a request for a blob the proxy holds gets: a status and the bytes of it."""

    status: int
    """200, 206, 304 or 416."""
    part: ByteRange | None
    """The bytes to send (None: none, for 304 and 416)."""


def blob_answer(
    size: int,
    etag: str,
    range_header: str | None = None,
    if_range: str | None = None,
    if_none_match: str | None = None,
) -> BlobAnswer:
    """The answer to a GET of a blob of ``size`` bytes whose entity tag is ``etag`` (quoted).

    As the registry answers: a matching ``If-None-Match`` is 304; an ``If-Range`` that does
    not match makes the Range void (the whole blob); a Range is 206 or 416.
    """
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        if "*" in tags or etag in tags:
            return BlobAnswer(304, None)
    whole = ByteRange(0, size - 1, size) if size else None
    if if_range is not None and if_range.strip() != etag:
        return BlobAnswer(200, whole)
    wanted = requested_range(range_header, size)
    if wanted is None:
        return BlobAnswer(200, whole)
    if isinstance(wanted, Unsatisfiable):
        return BlobAnswer(416, None)
    return BlobAnswer(206, wanted)
