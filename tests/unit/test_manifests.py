"""What a manifest names: the digests a client fetches after it."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.manifests import MAX_CHILDREN, References, references


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_an_image_manifest() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": digest(1)},
            "layers": [{"digest": digest(2)}, {"digest": digest(3)}],
            "subject": {"digest": digest(9)},
        }
    ).encode()
    assert references(body) == References(frozenset({digest(1), digest(2), digest(3)}), ())


def test_an_index() -> None:
    body = json.dumps({"manifests": [{"digest": digest(n)} for n in range(40)]}).encode()
    found = references(body)
    assert found.blobs == frozenset()
    assert found.children == tuple(digest(n) for n in range(MAX_CHILDREN))


def test_artifacts_and_schema_1() -> None:
    artifact = json.dumps({"blobs": [{"digest": digest(4)}]}).encode()
    assert references(artifact).blobs == {digest(4)}
    schema1 = json.dumps({"fsLayers": [{"blobSum": digest(5)}, {"blobSum": "nope"}]}).encode()
    assert references(schema1).blobs == {digest(5)}


def test_entries_that_are_no_digests_are_skipped() -> None:
    body = json.dumps(
        {"config": {"digest": 3}, "layers": [{"digest": "../x"}, "x", None], "manifests": {}}
    ).encode()
    assert references(body) == References(frozenset(), ())


@given(st.binary(max_size=200))
def test_any_body_is_read_without_a_crash(body: bytes) -> None:
    assert isinstance(references(body), References)


def test_deep_nesting_is_no_crash() -> None:
    assert references(b"[" * 100_000) == References(frozenset(), ())


def test_thirty_two_children_of_an_index_are_followed() -> None:
    # One per platform, and a few more for attestations.
    index = {"manifests": [{"digest": digest(n)} for n in range(33)]}
    assert references(json.dumps(index).encode()).children == tuple(map(digest, range(32)))
