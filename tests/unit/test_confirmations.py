"""The cache's memory of which credentials the upstream let read which content."""

from __future__ import annotations

import hashlib

from balena_registry_proxy.confirmations import Confirmations, key

DIGEST = "sha256:" + "1" * 64


def test_a_confirmation_is_fresh_for_60_seconds() -> None:
    memory = Confirmations()
    confirmed = key("Bearer a", "v2/public", DIGEST)
    assert not memory.fresh(confirmed, now=100.0)
    memory.remember(confirmed, now=100.0)
    assert memory.fresh(confirmed, now=160.0)
    assert not memory.fresh(confirmed, now=160.5)
    assert memory.ever(confirmed)
    memory.remember(confirmed, now=200.0)
    assert memory.fresh(confirmed, now=259.0)


def test_credentials_are_kept_as_the_hash_of_their_bytes() -> None:
    # An Authorization value that is not valid UTF-8 still has a key (its raw bytes hashed).
    assert key("\udcff", "r", "d") == (hashlib.sha256(b"\xff").hexdigest(), "r", "d")
    assert key("Bearer a", "r", "d")[0] == hashlib.sha256(b"Bearer a").hexdigest()


def test_a_digest_is_linked_to_a_repository_for_anyone_once_confirmed() -> None:
    memory = Confirmations()
    assert not memory.linked("v2/public", DIGEST)
    memory.remember(key("Bearer a", "v2/public", DIGEST), now=1.0)
    assert memory.linked("v2/public", DIGEST)
    assert not memory.linked("v2/private", DIGEST)
    assert not memory.ever(key("Bearer b", "v2/public", DIGEST))


def test_the_most_recent_ten_thousand_are_remembered() -> None:
    memory = Confirmations()
    keys = [key("c", f"v2/r{i}", DIGEST) for i in range(10_001)]
    for number, confirmation in enumerate(keys[:10_000]):
        memory.remember(confirmation, now=float(number))
    memory.remember(keys[0], now=20_000.0)  # the oldest is confirmed again: now the newest
    memory.remember(keys[10_000], now=20_001.0)
    assert memory.ever(keys[0])
    assert memory.linked("v2/r0", DIGEST)
    assert not memory.ever(keys[1])
    assert not memory.linked("v2/r1", DIGEST)
    assert all(memory.ever(confirmation) for confirmation in keys[2:])
    assert all(memory.linked(f"v2/r{number}", DIGEST) for number in range(2, 10_001))


def test_links_are_remembered_apart_from_who_confirmed_them() -> None:
    memory = Confirmations()
    # One repository and digest confirmed for ten thousand and one credentials: one link.
    for number in range(10_001):
        memory.remember(key(f"c{number}", "v2/r", DIGEST), now=float(number))
    assert memory.linked("v2/r", DIGEST)
    assert not memory.ever(key("c0", "v2/r", DIGEST))
    assert memory.ever(key("c1", "v2/r", DIGEST))
