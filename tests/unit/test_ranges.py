"""The Range of a blob request, as the proxy answers it from its own copy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.ranges import (
    UNSATISFIABLE,
    BlobAnswer,
    ByteRange,
    blob_answer,
    requested_range,
    unsatisfiable_content_range,
)

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", ByteRange(0, 99, SIZE)),
        ("bytes=100-", ByteRange(100, 999, SIZE)),
        ("bytes=990-5000", ByteRange(990, 999, SIZE)),
        ("bytes=-10", ByteRange(990, 999, SIZE)),
        ("bytes=-5000", ByteRange(0, 999, SIZE)),
        ("bytes=999-999", ByteRange(999, 999, SIZE)),
        (" bytes=5-6 ", ByteRange(5, 6, SIZE)),
        ("bytes=0-1,5-6", None),
        ("bytes=1000-", UNSATISFIABLE),
        ("bytes=5000-10000", UNSATISFIABLE),
        ("bytes=500-0", UNSATISFIABLE),
        ("bytes=-0", UNSATISFIABLE),
        ("bytes=-", UNSATISFIABLE),
        ("bytes=a-b", UNSATISFIABLE),
        ("items=0-1", UNSATISFIABLE),
        ("", UNSATISFIABLE),
    ],
)
def test_requested_range(header: str | None, expected: object) -> None:
    assert requested_range(header, SIZE) == expected


def test_the_content_ranges() -> None:
    assert ByteRange(100, 1123, 2048).content_range == "bytes 100-1123/2048"
    assert ByteRange(100, 1123, 2048).length == 1024
    assert unsatisfiable_content_range(2048) == "bytes */2048"
    assert requested_range("bytes=-1", 0) is UNSATISFIABLE


@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(1, 3000))
def test_a_satisfiable_range_lies_within_the_blob(first: int, last: int, size: int) -> None:
    found = requested_range(f"bytes={first}-{last}", size)
    if isinstance(found, ByteRange):
        assert 0 <= found.first <= found.last < size
        assert found.first == first
        assert found.last == min(last, size - 1)
    else:
        assert found is UNSATISFIABLE
        assert first >= size or last < first


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=999-", 1000, ByteRange(999, 999, 1000)),
        ("bytes=0-", 1, ByteRange(0, 0, 1)),
        ("bytes=0-", 0, UNSATISFIABLE),
        ("bytes=5-5", 1000, ByteRange(5, 5, 1000)),
        ("bytes=6-5", 1000, UNSATISFIABLE),
        ("bytes=-1000", 1000, ByteRange(0, 999, 1000)),
        ("bytes=-999", 1000, ByteRange(1, 999, 1000)),
        ("bytes=-1", 1, ByteRange(0, 0, 1)),
        ("bytes=0-0,1-1", 10, None),
    ],
)
def test_ranges_at_the_edges_of_the_blob(header: str, size: int, expected: object) -> None:
    assert requested_range(header, size) == expected


@given(st.integers(1, 5000), st.integers(1, 3000))
def test_a_suffix_range_is_the_last_bytes_of_the_blob(suffix: int, size: int) -> None:
    found = requested_range(f"bytes=-{suffix}", size)
    assert isinstance(found, ByteRange)
    assert (found.last, found.size) == (size - 1, size)
    assert found.length == min(suffix, size)


ETAG = '"sha256:abc"'
WHOLE = ByteRange(0, SIZE - 1, SIZE)


@pytest.mark.parametrize(
    ("range_header", "if_range", "if_none_match", "expected"),
    [
        (None, None, None, BlobAnswer(200, ByteRange(0, SIZE - 1, SIZE))),
        ("bytes=0-9", None, None, BlobAnswer(206, ByteRange(0, 9, SIZE))),
        ("bytes=2000-", None, None, BlobAnswer(416, None)),
        ("bytes=0-9", ETAG, None, BlobAnswer(206, ByteRange(0, 9, SIZE))),
        ("bytes=0-9", ' "sha256:abc" ', None, BlobAnswer(206, ByteRange(0, 9, SIZE))),
        ("bytes=0-9", '"other"', None, BlobAnswer(200, ByteRange(0, SIZE - 1, SIZE))),
        (
            "bytes=0-9",
            "Thu, 01 Jan 2026 00:00:00 GMT",
            None,
            BlobAnswer(200, ByteRange(0, 999, SIZE)),
        ),
        (None, None, ETAG, BlobAnswer(304, None)),
        ("bytes=0-9", None, f'"x", W/{ETAG}', BlobAnswer(304, None)),
        (None, None, "*", BlobAnswer(304, None)),
        (None, None, '"other"', BlobAnswer(200, ByteRange(0, SIZE - 1, SIZE))),
    ],
)
def test_blob_answer(
    range_header: str | None, if_range: str | None, if_none_match: str | None, expected: object
) -> None:
    assert blob_answer(SIZE, ETAG, range_header, if_range, if_none_match) == expected


def test_an_empty_blob_has_nothing_to_send() -> None:
    assert blob_answer(0, ETAG) == BlobAnswer(200, None)
