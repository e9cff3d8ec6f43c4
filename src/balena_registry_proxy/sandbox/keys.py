"""Token signing material for the sandbox: an RSA key, its self-signed certificate, its key id.

Docker distribution 2.8 verifies a registry token by looking the JWT header ``kid`` up among the
keys of the certificates in its ``rootcertbundle``; the id must be computed exactly as libtrust
does, which is what :func:`libtrust_key_id` reproduces. Distribution 3 names the certificates'
keys by their RFC 7638 thumbprint instead, but also trusts the keys of a JWKS file under the
``kid`` each one carries: :meth:`SigningKey.write_jwks` writes one that keeps the libtrust id, so
one token is accepted by both.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

__all__ = ["SigningKey", "generate_signing_key", "libtrust_key_id"]

_KEY_ID_BYTES = 30
_KEY_ID_GROUP = 4


def libtrust_key_id(public_key: PublicKeyTypes) -> str:
    """Return the libtrust key id of ``public_key``, the ``kid`` distribution 2.8 expects.

    The id is the unpadded RFC 4648 base32 encoding of the first 30 bytes of the SHA-256 of the
    DER SubjectPublicKeyInfo, in 12 colon-separated groups of 4 characters.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).digest()[:_KEY_ID_BYTES]
    encoded = base64.b32encode(digest).decode("ascii").rstrip("=")
    groups = [encoded[i : i + _KEY_ID_GROUP] for i in range(0, len(encoded), _KEY_ID_GROUP)]
    return ":".join(groups)


@dataclass(frozen=True)
class SigningKey:
    """An RS256 token signing key together with the certificate the registry trusts."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    certificate_pem: bytes = field(repr=False)
    kid: str

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` as an RS256 JWT whose header names this key's ``kid``."""
        return jwt.encode(
            dict(claims), self.private_key, algorithm="RS256", headers={"kid": self.kid}
        )

    def private_key_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write_pem(self, directory: Path) -> tuple[Path, Path]:
        """Write ``token.key`` (mode 0600) and ``token.crt`` into ``directory``.

        Returns the paths of the key and of the certificate.
        """
        key_path = directory / "token.key"
        cert_path = directory / "token.crt"
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.private_key_pem())
        cert_path.write_bytes(self.certificate_pem)
        return key_path, cert_path

    def write_jwks(self, directory: Path) -> Path:
        """Write ``token.jwks``: the public key as a JSON Web Key Set, under this key's ``kid``."""
        jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        path = directory / "token.jwks"
        path.write_text(json.dumps({"keys": [{**jwk, "kid": self.kid, "use": "sig"}]}))
        return path


def generate_signing_key(common_name: str = "balena-sandbox-token-issuer") -> SigningKey:
    """Generate a fresh RSA 2048 key and a self-signed certificate for it."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    # Backdate the validity window so a skewed clock between processes never matters.
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    return SigningKey(
        private_key=private_key,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        kid=libtrust_key_id(private_key.public_key()),
    )
