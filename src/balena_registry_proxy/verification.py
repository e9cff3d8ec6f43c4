"""Optional verification of registry tokens before their aliases are used.

Off by default: the upstream registry verifies every token it receives, so a forged alias gains
nothing there. Operators who want the proxy itself to refuse bad tokens (or who will serve bytes
without asking upstream, as a cache does) give it the key the registry trusts.

Pure apart from the clock: the key comes in as PEM bytes, results are cached per token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key

_CACHE_SIZE = 4096


def load_public_key(pem: bytes) -> PublicKeyTypes:
    """The public key of a PEM certificate or PEM public key; ValueError for anything else."""
    key: object
    if b"-----BEGIN CERTIFICATE-----" in pem:
        key = x509.load_pem_x509_certificate(pem).public_key()
    else:
        try:
            key = load_pem_public_key(pem)
        except (ValueError, TypeError) as error:
            raise ValueError("not a PEM certificate or public key") from error
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(
            f"a {type(key).__name__} cannot verify registry tokens: use RSA, EC or Ed25519"
        )
    return key


def algorithms_for(key: PublicKeyTypes) -> list[str]:
    """The JWT algorithms a key of this type verifies; ValueError for other key types.

    Tied to the key so that no token can choose an algorithm the key was not meant for.
    """
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ["ES256", "ES384", "ES512"]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ["EdDSA"]
    raise ValueError(f"a {type(key).__name__} cannot verify registry tokens")


class TokenVerifier:
    """Checks signature, ``exp``, ``nbf`` and ``aud`` of registry tokens."""

    def __init__(
        self,
        key: PublicKeyTypes,
        audience: str | None,
        *,
        leeway: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Verify against ``key``, accepting only tokens issued for ``audience``.

        With ``audience`` None it must be set (``audience = ...``) before the first check:
        the registry names it in its challenges (``service``).
        """
        self._key = key
        self._algorithms = algorithms_for(key)
        self.audience = audience
        self._leeway = leeway
        self._clock = clock
        # SHA-256 of a token -> expiry of a verified token, or None for one that failed:
        # clients send the same token on every request of a pull, and verifying it is the
        # costly part. Hashes, so junk tokens of any size cost the memory of a digest.
        self._seen: OrderedDict[bytes, float | None] = OrderedDict()

    def is_valid(self, token: str) -> bool:
        """Whether ``token`` is signed by the key, for the audience, and valid now."""
        if self.audience is None:
            raise RuntimeError("the tokens' audience is not known yet")
        now = self._clock()
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        if key in self._seen:
            self._seen.move_to_end(key)
            known = self._seen[key]
            return known is not None and now <= known + self._leeway
        try:
            expiry: float | None = self._verify(token)
        except (jwt.ImmatureSignatureError, jwt.DecodeError):
            return False  # not valid yet, or not even a JWT: nothing worth remembering
        except (jwt.PyJWTError, ValueError, TypeError):
            expiry = None
        self._seen[key] = expiry
        if len(self._seen) > _CACHE_SIZE:
            self._seen.popitem(last=False)
        return expiry is not None

    def _verify(self, token: str) -> float:
        claims = jwt.decode(
            token,
            self._key,  # type: ignore[arg-type]
            algorithms=self._algorithms,
            audience=self.audience,
            leeway=self._leeway,
            options={"require": ["exp", "aud"]},
        )
        return float(claims["exp"])
