"""Resolver mode's sealed tokens: they open only with the key, unaltered and unexpired."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from balena_registry_proxy.envelope import (
    MAX_TOKEN_LENGTH,
    PREFIX,
    Envelope,
    Sealer,
    derive_key,
    is_sealed,
)

NOW = 1_800_000_000
ENVELOPE = Envelope("alice", "alice-sandbox-api-key-0001", "eyJ.upstream.jwt", NOW + 14400)
KEY = derive_key("a shared secret of some length")
SEALER = Sealer(KEY)


def test_a_sealed_token_opens_to_what_went_in() -> None:
    token = SEALER.seal(ENVELOPE)
    assert is_sealed(token)
    assert SEALER.open(token, NOW) == ENVELOPE


def test_nothing_of_the_contents_shows() -> None:
    token = SEALER.seal(ENVELOPE)
    decoded = base64.urlsafe_b64decode(token[len(PREFIX) :] + "==")
    for secret in ("alice", "sandbox-api-key", "upstream"):
        assert secret not in token
        assert secret.encode() not in decoded


def test_two_seals_differ() -> None:
    assert SEALER.seal(ENVELOPE) != SEALER.seal(ENVELOPE)


def test_another_key_cannot_open_it() -> None:
    token = SEALER.seal(ENVELOPE)
    assert Sealer(derive_key("another secret of some length")).open(token, NOW) is None


def test_an_expired_token_does_not_open() -> None:
    token = SEALER.seal(ENVELOPE)
    assert SEALER.open(token, ENVELOPE.expires_at - 1) == ENVELOPE
    assert SEALER.open(token, ENVELOPE.expires_at) is None


@given(st.data())
def test_any_change_makes_it_unopenable(data: st.DataObject) -> None:
    token = SEALER.seal(ENVELOPE)
    position = data.draw(st.integers(len(PREFIX), len(token) - 1))
    replacement = data.draw(st.sampled_from("ABCabc012-_"))
    changed = token[:position] + replacement + token[position + 1 :]
    if changed == token or changed[:-1] == token[:-1]:
        # The last character's low bits are padding that base64 ignores.
        return
    assert SEALER.open(changed, NOW) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        PREFIX,
        PREFIX + "!!!",
        PREFIX + "AAAA",
        PREFIX + "A" * (MAX_TOKEN_LENGTH + 1),
        "eyJhbGciOiJFUzI1NiJ9.e30.sig",
    ],
)
def test_other_tokens_do_not_open(token: str) -> None:
    assert SEALER.open(token, NOW) is None


@given(
    st.one_of(st.none(), st.text(max_size=40)),
    st.one_of(st.none(), st.text(max_size=80)),
    st.text(max_size=2000),
    st.integers(0, 2**40),
)
def test_round_trip(
    username: str | None, password: str | None, upstream: str, expires: int
) -> None:
    envelope = Envelope(username, password, upstream, expires)
    token = SEALER.seal(envelope)
    assert SEALER.open(token, expires - 1) == envelope


def test_a_typical_token_stays_far_below_header_limits() -> None:
    # A registry token of the realm's without repositories is well under a KiB.
    envelope = dataclasses.replace(ENVELOPE, upstream="e" * 900)
    assert len(SEALER.seal(envelope)) < 2048


def test_the_caller_key_names_the_credentials_without_showing_them() -> None:
    assert ENVELOPE.caller != Envelope("alice", "other-key", "", 0).caller
    assert ENVELOPE.caller == Envelope("alice", ENVELOPE.password, "x", 2).caller
    assert ENVELOPE.password is not None
    assert ENVELOPE.password not in ENVELOPE.caller
    assert Envelope(None, None, "", 0).caller == "anonymous"


def test_one_key_under_many_usernames_is_one_caller() -> None:
    # The realm takes any username with a key: were the username part of the caller, one key
    # could fill the per-caller caches under endless names.
    assert ENVELOPE.caller == Envelope("bob", ENVELOPE.password, "", 0).caller
    assert ENVELOPE.caller == Envelope(None, ENVELOPE.password, "", 0).caller


def test_keys_derive_the_same_everywhere() -> None:
    assert derive_key("secret secret secret") == derive_key("secret secret secret")
    assert len(derive_key("x")) == 32
    assert derive_key("secret secret secret") != derive_key("secret secret secreT")


# A token sealed by this version (the format since 070af58: scrypt, no issued_at) under
# SEALER's key. Replicas of one release share tokens, and in a rolling update so do two
# releases: a change to the format (prefix, nonce, associated data, key derivation, payload)
# would log every client out, and must be deliberate.
SEALED_BEFORE = (
    "brp1.oV2cah03xffbK-6purQIyLvL3IKj-_FVuCkrvw9nbDy2QNpMMPJUAKIFhV1XeeS8EoeOuG86CVg_jRMm6JN2nTb"
    "cgofp09vFPjUh7b9vwjw2lzsJBCKYJBiBUNMmWWJg"
)


def test_a_token_sealed_before_still_opens() -> None:
    assert SEALER.open(SEALED_BEFORE, NOW) == ENVELOPE


def test_tokens_start_with_the_prefix_registry_tokens_never_have() -> None:
    # Registry tokens are JWTs, which start with "ey" (a JSON header, base64).
    assert SEALER.seal(ENVELOPE).startswith("brp1.")
    assert not is_sealed("eyJhbGciOiJFUzI1NiJ9.e30.sig")


def test_a_token_of_8_kib_opens_and_a_longer_one_is_refused_unopened() -> None:
    at_limit = SEALER.seal(dataclasses.replace(ENVELOPE, upstream="e" * 6060))
    beyond = SEALER.seal(dataclasses.replace(ENVELOPE, upstream="e" * 6061))
    assert (len(at_limit), len(beyond)) == (8192, 8193)
    assert SEALER.open(at_limit, NOW) is not None
    assert SEALER.open(beyond, NOW) is None


def test_a_token_opens_until_the_second_it_expires_and_never_after() -> None:
    token = SEALER.seal(ENVELOPE)
    assert SEALER.open(token, ENVELOPE.expires_at + 1) is None
    assert SEALER.open(token, ENVELOPE.expires_at + 14400) is None


def test_a_token_whose_text_ends_in_x_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    # With this nonce and contents the token's last character is an 'X': only the '='
    # padding is taken off the end.
    monkeypatch.setattr("balena_registry_proxy.envelope.os.urandom", bytes)
    token = SEALER.seal(dataclasses.replace(ENVELOPE, upstream="e" * 109))
    assert token.endswith("X")
    assert SEALER.open(token, NOW) == dataclasses.replace(ENVELOPE, upstream="e" * 109)


def sealed(payload: object) -> str:
    """A token around ``payload``, sealed as an older or newer version might have."""
    nonce = bytes(12)
    text = AESGCM(KEY).encrypt(nonce, json.dumps(payload).encode(), b"brp1.")
    return "brp1." + base64.urlsafe_b64encode(nonce + text).decode()


@pytest.mark.parametrize(
    "payload",
    [
        3,
        "alice",
        {"username": "alice"},
        ["alice", "key", "up"],
        ["alice", "key", "up", NOW + 60, "extra"],
        ["alice", "key", "up", NOW, NOW + 60],
        [3, "key", "up", NOW + 60],
        ["alice", 3, "up", NOW + 60],
        [None, None, 3, NOW + 60],
        ["alice", "key", "up", "then"],
        ["alice", "key", "up", float(NOW + 60)],
    ],
)
def test_a_payload_of_another_shape_is_no_token(payload: object) -> None:
    assert SEALER.open(sealed(["alice", "key", "up", NOW + 60]), NOW) == Envelope(
        "alice", "key", "up", NOW + 60
    )
    assert SEALER.open(sealed(payload), NOW) is None
