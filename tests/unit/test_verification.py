"""Optional token verification: signature, exp, nbf, aud, and the per-token cache."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from balena_registry_proxy.sandbox import SigningKey, generate_signing_key
from balena_registry_proxy.verification import TokenVerifier, load_public_key

AUDIENCE = "registry2.example.com"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return generate_signing_key()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"aud": AUDIENCE, "exp": now + 600, "nbf": now - 10, "access": []}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def verifier(key: SigningKey, clock: Any = time.time) -> TokenVerifier:
    return TokenVerifier(load_public_key(key.certificate_pem), AUDIENCE, clock=clock)


def test_a_good_token_verifies(key: SigningKey) -> None:
    assert verifier(key).is_valid(key.sign(claims()))


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": int(time.time()) - 3600},
        {"nbf": int(time.time()) + 3600},
        {"aud": "some-other-registry"},
        {"aud": None},
        {"exp": None},
    ],
)
def test_bad_claims_fail(key: SigningKey, bad: dict[str, Any]) -> None:
    assert not verifier(key).is_valid(key.sign(claims(**bad)))


def test_another_keys_signature_fails(key: SigningKey, other_key: SigningKey) -> None:
    assert not verifier(key).is_valid(other_key.sign(claims()))


def test_symmetric_algorithms_are_never_accepted(key: SigningKey) -> None:
    # Only asymmetric algorithms are listed, so no HMAC token passes, whatever its secret.
    forged = jwt.encode(claims(), "not-the-private-key-but-long-enough-0123456789", "HS256")
    assert not verifier(key).is_valid(forged)
    assert not verifier(key).is_valid("not.a.token")


def test_a_public_key_pem_works_too(key: SigningKey) -> None:
    public = load_public_key(key.certificate_pem).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    assert TokenVerifier(load_public_key(public), AUDIENCE).is_valid(key.sign(claims()))


def test_ed25519_keys_verify_eddsa_tokens() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    token = jwt.encode(claims(), private, algorithm="EdDSA")
    assert TokenVerifier(load_public_key(public), AUDIENCE).is_valid(token)


def test_load_public_key_refuses_other_pem(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="not a PEM certificate or public key"):
        load_public_key(key.private_key_pem())
    with pytest.raises(ValueError, match="not a PEM certificate or public key"):
        load_public_key(b"hello")


def test_cached_verdicts_still_expire(key: SigningKey) -> None:
    now = [time.time()]
    check = verifier(key, clock=lambda: now[0])
    token = key.sign(claims(exp=int(now[0]) + 60))
    assert check.is_valid(token)
    now[0] += 60 + 31
    assert not check.is_valid(token)
