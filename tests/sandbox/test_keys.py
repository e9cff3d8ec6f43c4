"""Signing key generation and the libtrust key id."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from balena_registry_proxy.sandbox.keys import SigningKey, generate_signing_key, libtrust_key_id

KID_RE = re.compile(r"^[A-Z2-7]{4}(?::[A-Z2-7]{4}){11}$")


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return generate_signing_key()


def test_kid_is_twelve_groups_of_four_base32_characters(signing_key: SigningKey) -> None:
    assert KID_RE.match(signing_key.kid)


def test_kid_encodes_first_30_bytes_of_spki_sha256(signing_key: SigningKey) -> None:
    der = signing_key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    decoded = base64.b32decode(signing_key.kid.replace(":", ""))
    assert decoded == hashlib.sha256(der).digest()[:30]


def test_kid_matches_the_certificate_key(signing_key: SigningKey) -> None:
    certificate = x509.load_pem_x509_certificate(signing_key.certificate_pem)
    assert libtrust_key_id(certificate.public_key()) == signing_key.kid


def test_certificate_is_self_signed(signing_key: SigningKey) -> None:
    certificate = x509.load_pem_x509_certificate(signing_key.certificate_pem)
    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)


def test_signed_token_verifies_with_certificate_key(signing_key: SigningKey) -> None:
    token = signing_key.sign({"sub": "alice", "aud": "svc"})
    assert jwt.get_unverified_header(token) == {
        "alg": "RS256",
        "kid": signing_key.kid,
        "typ": "JWT",
    }
    public_key = x509.load_pem_x509_certificate(signing_key.certificate_pem).public_key()
    claims = jwt.decode(token, public_key, algorithms=["RS256"], audience="svc")  # type: ignore[arg-type]
    assert claims == {"sub": "alice", "aud": "svc"}


def test_token_from_another_key_does_not_verify(signing_key: SigningKey) -> None:
    other = generate_signing_key()
    token = other.sign({"sub": "mallory"})
    public_key = signing_key.private_key.public_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, public_key, algorithms=["RS256"])


def test_write_pem_round_trips_with_private_key_mode(
    signing_key: SigningKey, tmp_path: Path
) -> None:
    key_path, cert_path = signing_key.write_pem(tmp_path)
    assert key_path.stat().st_mode & 0o077 == 0
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert libtrust_key_id(loaded.public_key()) == signing_key.kid
    assert cert_path.read_bytes() == signing_key.certificate_pem


def test_jwks_names_the_public_key_by_its_libtrust_id(
    signing_key: SigningKey, tmp_path: Path
) -> None:
    path = signing_key.write_jwks(tmp_path)
    (key,) = jwt.PyJWKSet.from_json(path.read_text()).keys
    # Distribution 3 trusts a token whose kid names a JWKS key: the kid 2.8 expects must do.
    assert key.key_id == signing_key.kid
    token = signing_key.sign({"sub": "alice"})
    assert jwt.decode(token, key, algorithms=["RS256"]) == {"sub": "alice"}
    assert "PRIVATE" not in path.read_text()
    assert '"d"' not in path.read_text()


def test_repr_does_not_leak_the_private_key(signing_key: SigningKey) -> None:
    assert "PRIVATE" not in repr(signing_key)
    assert signing_key.kid in repr(signing_key)
