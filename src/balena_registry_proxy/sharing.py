"""The shared cache's rules: names in Redis and the bucket, the lease, the replicas' signature.

Pure, no I/O. Several replicas share one bucket (the bytes) and one Redis (who is filling
what, which client was confirmed, what was used when). A replica that downloads a blob from
upstream holds a lease on its digest: a Redis key naming the holder and where other replicas
can read the download as it grows. The lease is renewed while the download makes progress and
lapses ``LEASE_SECONDS`` after the last renewal, so when its holder dies another replica takes
over soon. Between replicas, the holder's internal endpoint answers only requests signed with
the shared secret, for one digest and a short while (``peer_signature``): a client's token
never opens it, and a signature seen once is no key to anything else.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

from .digests import SHA256_RE

LEASE_SECONDS = 10.0
"""A lease lapses this long after its last renewal: how long a dead holder blocks a digest."""
RENEW_SECONDS = 2.0
"""How often a holder whose download progresses renews its lease."""
PEER_SIGNATURE_SECONDS = 60
"""How long a signature for a replica's endpoint is good for."""
PEER_PATH = "/_cache/blobs/"
"""The replicas' endpoint: ``PEER_PATH + digest``. Outside ``/v2``: no registry route."""
PEER_HEADER = "X-Cache-Peer"
"""The request header carrying the signature."""
PART_BYTES = 8 << 20
"""The size of one part of a multipart upload (S3 wants at least 5 MiB but for the last)."""
MAX_PARTS = 10_000
"""S3's limit on the parts of one upload: bigger blobs get bigger parts."""
PIN_SECONDS = 60.0
"""A blob just served from storage is not evicted for this long (or for its presigned URL's
lifetime, when longer): a client is reading it."""
MIN_SECRET_LENGTH = 16


class Kind(Enum):
    """What an object in the bucket holds."""

    BLOB = "blobs"
    MANIFEST = "manifests"


def object_key(prefix: str, kind: Kind, digest: str) -> str:
    """The object's key in the bucket: ``<prefix><blobs|manifests>/sha256/<hex>``."""
    return f"{prefix}{kind.value}/sha256/{digest.removeprefix('sha256:')}"


def namespace(bucket: str, prefix: str) -> str:
    """The Redis key prefix of one cache: two caches sharing a Redis never mix their keys."""
    return "brp:" + hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16] + ":"


def lease_key(space: str, digest: str) -> str:
    """The Redis key of the lease on filling ``digest``."""
    return f"{space}lease:{digest}"


def pin_key(space: str, member: str) -> str:
    """The Redis key that keeps ``member`` (see ``index_member``) from being evicted."""
    return f"{space}pin:{member}"


def index_member(kind: Kind, digest: str) -> str:
    """An object's name in the least-recently-used index."""
    return f"{kind.value}/{digest}"


def member_object(member: str) -> tuple[Kind, str] | None:
    """The kind and digest an index member names, or None for anything else."""
    kind, _, digest = member.partition("/")
    if kind not in (Kind.BLOB.value, Kind.MANIFEST.value) or not SHA256_RE.fullmatch(digest):
        return None
    return Kind(kind), digest


def confirmation_key(
    secret: str, space: str, credentials: str, repository: str, digest: str
) -> str:
    """The Redis key that says the upstream let ``credentials`` read ``digest`` under
    ``repository``: an HMAC of the three under the replicas' ``secret``, so no credential is
    ever stored, and whoever can list Redis's keys cannot test guesses of one."""
    message = "\n".join((credentials, repository, digest)).encode("utf-8", "surrogateescape")
    hashed = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"{space}confirmed:{hashed}"


@dataclass(frozen=True, slots=True)
class Holder:
    """The replica filling a digest: its id, and the URL other replicas read it at."""

    replica: str
    url: str


def lease_value(holder: Holder) -> str:
    """What a lease's key holds."""
    return f"{holder.replica} {holder.url}"


def parse_lease(value: str) -> Holder | None:
    """The holder a lease names, or None for a value that is not one."""
    replica, _, url = value.partition(" ")
    if not replica or not url.startswith(("http://", "https://")) or " " in url:
        return None
    return Holder(replica, url.rstrip("/"))


class Source(Enum):
    """Where a replica gets a blob it was asked for and does not have on its own."""

    STORAGE = "storage"
    """The bucket holds it."""
    LOCAL = "local"
    """This replica is downloading it: follow the growing file."""
    PEER = "peer"
    """Another replica holds the lease: read its download as it grows."""
    FILL = "fill"
    """Nobody has it: take the lease (or, without Redis, just) download it."""


def source(*, stored: bool, local: bool, holder: Holder | None, replica: str) -> Source:
    """Where the bytes of a blob come from, given what is known of it now.

    The bucket first (verified bytes, no replica involved), then a download of this replica's
    own, then the lease holder's; with none of these, a new download.
    """
    if stored:
        return Source.STORAGE
    if local:
        return Source.LOCAL
    if holder is not None and holder.replica != replica:
        return Source.PEER
    return Source.FILL


def peer_signature(secret: str, digest: str, expires: int) -> str:
    """The header value that lets a replica read ``digest`` from another until ``expires``
    (Unix seconds): the expiry and an HMAC-SHA256 of both, never the secret itself."""
    mac = hmac.new(secret.encode(), f"{digest}\n{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def peer_signature_valid(secret: str, digest: str, value: str, now: float) -> bool:
    """Whether ``value`` is a signature of ``digest`` by ``secret`` that is good at ``now``."""
    # Anyone can send this header: text that is no signature (digits of other scripts,
    # which int() refuses; non-ASCII, which compare_digest refuses) is simply not one.
    if not value.isascii():
        return False
    expires, _, _ = value.partition(".")
    if not expires.isdigit() or len(expires) > 12:
        return False
    if not now <= int(expires) <= now + 2 * PEER_SIGNATURE_SECONDS:
        return False
    return hmac.compare_digest(peer_signature(secret, digest, int(expires)), value)


def parts(size: int) -> list[tuple[int, int, int]]:
    """The parts of a multipart upload of ``size`` bytes: (number, first byte, last byte).

    ``PART_BYTES`` each, more for a blob that would need more than ``MAX_PARTS``; the last
    part takes what is left. A blob of one part or less is not uploaded in parts at all.
    """
    step = max(PART_BYTES, -(-size // MAX_PARTS))
    return [
        (number, first, min(first + step, size) - 1)
        for number, first in enumerate(range(0, size, step), start=1)
    ]
