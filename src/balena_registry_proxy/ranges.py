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
