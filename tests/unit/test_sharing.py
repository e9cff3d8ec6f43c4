"""The shared cache's rules (sharing.py): names, leases, sources, signatures, parts."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import given

from balena_registry_proxy.sharing import (
    LEASE_SECONDS,
    MAX_PARTS,
    MIN_SECRET_LENGTH,
    PART_BYTES,
    PEER_HEADER,
    PEER_PATH,
    PEER_SIGNATURE_SECONDS,
    PIN_SECONDS,
    RENEW_SECONDS,
    Holder,
    Kind,
    Source,
    confirmation_key,
    index_member,
    lease_key,
    lease_value,
    member_object,
    namespace,
    object_key,
    parse_lease,
    parts,
    peer_signature,
    peer_signature_valid,
    pin_key,
    source,
)

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
SECRET = "sixteen-chars-or-more"
ME = Holder("me", "http://10.0.0.1:8080")
THEM = Holder("them", "http://10.0.0.2:8080")


def test_objects_are_named_by_kind_and_digest_under_the_prefix() -> None:
    assert object_key("cache/", Kind.BLOB, DIGEST) == "cache/blobs/sha256/" + "ab" * 32
    assert object_key("", Kind.MANIFEST, DIGEST) == "manifests/sha256/" + "ab" * 32


def test_two_caches_on_one_redis_never_share_keys() -> None:
    assert namespace("bucket", "a/") != namespace("bucket", "b/")
    assert namespace("one", "") != namespace("two", "")
    assert namespace("bucket", "a/") == namespace("bucket", "a/")


@pytest.mark.parametrize("kind", list(Kind))
def test_index_members_name_their_object(kind: Kind) -> None:
    assert member_object(index_member(kind, DIGEST)) == (kind, DIGEST)


@pytest.mark.parametrize("member", ["", "blobs/", "other/" + DIGEST, "blobs/sha256:xyz"])
def test_anything_else_in_the_index_names_nothing(member: str) -> None:
    assert member_object(member) is None


def test_confirmations_are_keyed_by_a_hash_of_all_three_never_the_token() -> None:
    key = confirmation_key(SECRET, "brp:x:", "Bearer secret-token", "v2/abc", DIGEST)
    assert "secret-token" not in key
    assert key.startswith("brp:x:confirmed:")
    others = {
        confirmation_key(SECRET, "brp:x:", "Bearer other-token", "v2/abc", DIGEST),
        confirmation_key(SECRET, "brp:x:", "Bearer secret-token", "v2/def", DIGEST),
        confirmation_key(SECRET, "brp:x:", "Bearer secret-token", "v2/abc", OTHER),
        # Keyed by the replicas' secret: without it, a guess cannot be checked.
        confirmation_key("another-secret-xx", "brp:x:", "Bearer secret-token", "v2/abc", DIGEST),
    }
    assert key not in others
    assert len(others) == 4
    plain = hashlib.sha256(f"Bearer secret-token\nv2/abc\n{DIGEST}".encode()).hexdigest()
    assert plain not in key


@given(st.text(alphabet=st.characters(blacklist_categories=["Zs", "Cc"]), min_size=1))
def test_a_lease_names_its_holder(replica: str) -> None:
    holder = Holder(replica, "http://peer:8080")
    assert parse_lease(lease_value(holder)) == holder


@pytest.mark.parametrize("value", ["", "me", "me ftp://x", "me http://a b", " http://x"])
def test_a_value_that_is_no_lease_names_no_holder(value: str) -> None:
    assert parse_lease(value) is None


@pytest.mark.parametrize(
    ("stored", "local", "holder", "expected"),
    [
        (True, True, THEM, Source.STORAGE),
        (False, True, THEM, Source.LOCAL),
        (False, False, THEM, Source.PEER),
        (False, False, ME, Source.FILL),
        (False, False, None, Source.FILL),
    ],
)
def test_the_source_of_a_blob(
    stored: bool, local: bool, holder: Holder | None, expected: Source
) -> None:
    assert source(stored=stored, local=local, holder=holder, replica=ME.replica) is expected


def test_a_signature_opens_one_digest_for_a_while() -> None:
    now = 1_800_000_000
    signed = peer_signature(SECRET, DIGEST, now + PEER_SIGNATURE_SECONDS)
    assert SECRET not in signed
    assert peer_signature_valid(SECRET, DIGEST, signed, now)
    assert not peer_signature_valid(SECRET, OTHER, signed, now)
    assert not peer_signature_valid("another-secret-entirely", DIGEST, signed, now)
    assert not peer_signature_valid(SECRET, DIGEST, signed, now + PEER_SIGNATURE_SECONDS + 1)
    # One that claims to last far longer than any replica signs for is refused too.
    far = peer_signature(SECRET, DIGEST, now + 100 * PEER_SIGNATURE_SECONDS)
    assert not peer_signature_valid(SECRET, DIGEST, far, now)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "x.y",
        "123",
        "1" * 13 + ".ab",
        "Bearer token",
        "\u00b2",  # a digit to str.isdigit(), none to int()
        "1800000030.\u00e9abc",  # compare_digest refuses non-ASCII text
    ],
)
def test_what_is_no_signature_opens_nothing(value: str) -> None:
    assert not peer_signature_valid(SECRET, DIGEST, value, 1_800_000_000)


@given(st.text(max_size=120))
def test_no_header_value_makes_the_check_fail_other_than_by_refusing(value: str) -> None:
    assert not peer_signature_valid(SECRET, DIGEST, value, 1_800_000_000)


@given(st.integers(min_value=1, max_value=1 << 46))
def test_parts_cover_a_blob_once_in_order_within_s3s_limits(size: int) -> None:
    planned = parts(size)
    assert [number for number, _, _ in planned] == list(range(1, len(planned) + 1))
    assert planned[0][1] == 0
    assert planned[-1][2] == size - 1
    for (_, _, last), (_, first, _) in itertools.pairwise(planned):
        assert first == last + 1
    assert len(planned) <= MAX_PARTS
    # Every part but the last is at least PART_BYTES (S3 wants 5 MiB).
    assert all(last - first + 1 >= PART_BYTES for _, first, last in planned[:-1])


def test_the_numbers_the_readme_gives() -> None:
    # Leases lapse 10 s after the last renewal, renewed every 2 s; parts of 8 MiB, at most
    # S3's 10,000; a replica's signature good for a minute; a served object pinned a minute.
    assert (LEASE_SECONDS, RENEW_SECONDS, PEER_SIGNATURE_SECONDS) == (10.0, 2.0, 60)
    assert (PART_BYTES, MAX_PARTS) == (8 * 1024 * 1024, 10_000)
    assert (PIN_SECONDS, MIN_SECRET_LENGTH) == (60.0, 16)
    assert (PEER_PATH, PEER_HEADER) == ("/_cache/blobs/", "X-Cache-Peer")


def test_names_in_redis_and_signatures_are_stable_across_versions() -> None:
    # Replicas of two versions share one Redis during a rolling update: they must name keys
    # and sign requests alike, so the formats are pinned byte for byte.
    space = namespace("layers", "proxy/")
    assert space == "brp:" + hashlib.sha256(b"layers/proxy/").hexdigest()[:16] + ":"
    assert lease_key(space, DIGEST) == f"{space}lease:{DIGEST}"
    assert pin_key(space, "blobs/x") == f"{space}pin:blobs/x"
    message = f"Bearer t\nv2/abc\n{DIGEST}".encode()
    expected = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert confirmation_key(SECRET, space, "Bearer t", "v2/abc", DIGEST) == (
        f"{space}confirmed:{expected}"
    )
    mac = hmac.new(SECRET.encode(), f"{DIGEST}\n1800000060".encode(), hashlib.sha256)
    assert peer_signature(SECRET, DIGEST, 1_800_000_060) == f"1800000060.{mac.hexdigest()}"


def test_credentials_that_are_no_valid_text_still_make_a_key() -> None:
    # Header values reach Python as latin-1 or with surrogates; they must hash, not raise.
    assert confirmation_key(SECRET, "s:", "Basic \udcff", "v2/abc", DIGEST).startswith("s:")


def test_a_signature_is_good_from_now_to_twice_its_lifetime() -> None:
    now = 1_800_000_000
    for expires, good in (
        (now - 1, False),
        (now, True),
        (now + 2 * PEER_SIGNATURE_SECONDS, True),
        (now + 2 * PEER_SIGNATURE_SECONDS + 1, False),
    ):
        value = peer_signature(SECRET, DIGEST, expires)
        assert peer_signature_valid(SECRET, DIGEST, value, now) is good, expires


def test_an_expiry_of_twelve_digits_is_read_and_one_of_thirteen_is_not() -> None:
    for now in (10**11, 10**12):
        value = peer_signature(SECRET, DIGEST, now + 1)
        assert peer_signature_valid(SECRET, DIGEST, value, now) is (now < 10**12)


def test_a_holder_sorting_before_this_replica_is_a_peer_too() -> None:
    early = Holder("a", "http://10.0.0.3:8080")
    assert source(stored=False, local=False, holder=early, replica="b") is Source.PEER


def test_a_blob_of_exactly_max_parts_big_parts_is_cut_in_max_parts() -> None:
    size = MAX_PARTS * (9 << 20)
    cut = parts(size)
    assert len(cut) == MAX_PARTS
    assert {last - first + 1 for _, first, last in cut} == {9 << 20}


def test_a_lease_may_name_an_https_holder_and_loses_a_trailing_slash() -> None:
    assert parse_lease("r1 https://10.0.0.4:8443/") == Holder("r1", "https://10.0.0.4:8443")
    assert parse_lease("r2 http://replica-X/") == Holder("r2", "http://replica-X")


def test_a_holder_is_a_frozen_value() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ME.replica = "other"  # type: ignore[misc]
