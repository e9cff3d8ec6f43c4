"""Build small deterministic OCI images for every catalog release and push them to the registry.

Image construction is pure (bytes in, bytes out, stable digests); :func:`seed_registry` does the
pushing over the registry HTTP API with a push token minted in-process.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import aiohttp
from yarl import URL

from .catalog import DEFAULT_SERVICE_NAME, App, Catalog, Platform, Release, ReleaseImage

__all__ = [
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "Descriptor",
    "GeneratedLayer",
    "Image",
    "Layer",
    "PushedManifest",
    "SeedError",
    "SeedResult",
    "SeededImage",
    "build_image",
    "build_index",
    "deterministic_tar_gz",
    "manifest_digest",
    "release_text",
    "seed_registry",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_MIB = 1024 * 1024
_TAR_BLOCK = 512
# Fixed timestamps keep the digests identical from one run to the next.
_CREATED = "2023-11-14T22:13:20Z"
_MTIME = 1700000000
_PUSH_CONCURRENCY = 4


class SeedError(RuntimeError):
    """The registry refused part of the seed."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes, platform: Platform | None = None) -> Descriptor:
        """Describe ``data``."""
        return cls(media_type, _sha256(data), len(data), platform)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears inside a manifest or index."""
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            doc["platform"] = _platform_json(self.platform)
        return doc


@dataclass(frozen=True)
class GeneratedLayer:
    """A large incompressible layer, regenerated chunk by chunk instead of held in memory.

    The layer is a tar holding ``random.bin``: ``size_mib`` MiB of SHAKE-128 output keyed by
    ``seed``, gzip-wrapped with stored (level 0) blocks since random bytes do not compress.
    """

    seed: str
    size_mib: int
    chunk_size: int = _MIB

    def uncompressed_chunks(self) -> Iterator[bytes]:
        """The tar stream."""
        info = tarfile.TarInfo("random.bin")
        info.size = self.size_mib * _MIB
        info.mtime = _MTIME
        info.mode = 0o644
        yield info.tobuf(format=tarfile.USTAR_FORMAT)
        for index in range(info.size // self.chunk_size):
            yield hashlib.shake_128(f"{self.seed}:{index}".encode()).digest(self.chunk_size)
        # Size is a whole number of MiB, hence of tar blocks: only the end-of-archive marker.
        yield bytes(2 * _TAR_BLOCK)

    def chunks(self) -> Iterator[bytes]:
        """The gzip stream, i.e. the blob as stored in the registry."""
        # wbits=31 selects the gzip container; zlib writes a zero mtime, keeping it stable.
        compressor = zlib.compressobj(0, zlib.DEFLATED, 31)
        for chunk in self.uncompressed_chunks():
            yield compressor.compress(chunk)
        yield compressor.flush()

    def measure(self) -> Layer:
        """Hash the layer in one streaming pass (CPU-bound: run it off the event loop)."""
        diff_id = hashlib.sha256()
        digest = hashlib.sha256()
        size = 0
        compressor = zlib.compressobj(0, zlib.DEFLATED, 31)
        for chunk in self.uncompressed_chunks():
            diff_id.update(chunk)
            compressed = compressor.compress(chunk)
            digest.update(compressed)
            size += len(compressed)
        tail = compressor.flush()
        digest.update(tail)
        size += len(tail)
        descriptor = Descriptor(OCI_LAYER_GZIP, f"sha256:{digest.hexdigest()}", size)
        return Layer(descriptor=descriptor, diff_id=f"sha256:{diff_id.hexdigest()}", content=self)


@dataclass(frozen=True)
class Layer:
    """A layer blob: its descriptor, its uncompressed digest and its bytes or generator."""

    descriptor: Descriptor
    diff_id: str
    content: bytes | GeneratedLayer = field(repr=False)


@dataclass(frozen=True)
class Image:
    """A single-platform image ready to push: config, layers and the manifest bytes."""

    platform: Platform
    config: bytes
    layers: tuple[Layer, ...]
    manifest: bytes

    @property
    def config_descriptor(self) -> Descriptor:
        """Descriptor of the config blob."""
        return Descriptor.of(OCI_CONFIG, self.config)

    @property
    def manifest_descriptor(self) -> Descriptor:
        """Descriptor of the manifest, carrying the platform for use in an index."""
        return Descriptor.of(OCI_MANIFEST, self.manifest, self.platform)


@dataclass(frozen=True)
class PushedManifest:
    """A manifest as stored in the registry."""

    digest: str
    media_type: str
    size: int
    config_digest: str | None = None
    layer_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeededImage:
    """What was pushed for the image of one service of a release, at ``<repository>:latest``."""

    commit: str
    repository: str
    manifest: PushedManifest
    # Child manifests by platform string ("linux/arm64"); empty unless ``manifest`` is an index.
    platform_manifests: Mapping[str, PushedManifest] = field(default_factory=dict)
    service: str = DEFAULT_SERVICE_NAME

    @property
    def digest(self) -> str:
        """Digest of the manifest (or index) tagged ``latest``."""
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        """Media type of the manifest (or index) tagged ``latest``."""
        return self.manifest.media_type

    @property
    def layer_digests(self) -> tuple[str, ...]:
        """Every layer digest of the release, children included for an index."""
        children = [d for m in self.platform_manifests.values() for d in m.layer_digests]
        return self.manifest.layer_digests + tuple(children)


@dataclass(frozen=True)
class SeedResult:
    """Every seeded image, keyed by repository (``v2/<hash>``)."""

    images: Mapping[str, SeededImage]

    @property
    def releases(self) -> dict[str, SeededImage]:
        """The image of every single-service release, keyed by commit."""
        counts: dict[str, int] = {}
        for image in self.images.values():
            counts[image.commit] = counts.get(image.commit, 0) + 1
        return {i.commit: i for i in self.images.values() if counts[i.commit] == 1}

    def __getitem__(self, commit: str) -> SeededImage:
        """The image of the single-service release ``commit``."""
        return self.releases[commit]

    def services(self, commit: str) -> dict[str, SeededImage]:
        """Every image of release ``commit``, keyed by service name."""
        return {i.service: i for i in self.images.values() if i.commit == commit}


# --------------------------------------------------------------------------- pure construction


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _platform_json(platform: Platform) -> dict[str, str]:
    doc = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant is not None:
        doc["variant"] = platform.variant
    return doc


def deterministic_tar_gz(files: Mapping[str, bytes]) -> tuple[bytes, bytes]:
    """Return ``(tar, tar.gz)`` for ``files`` with fixed metadata, so digests never drift."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    tar = buffer.getvalue()
    return tar, gzip.compress(tar, mtime=0)


def release_text(
    app: App, release: Release, platform: Platform | None = None, service: str | None = None
) -> str:
    """The ``release.txt`` contents identifying which image a client actually received."""
    text = f"{app.slug} commit={release.commit} version={release.version}"
    if service is not None:
        text = f"{text} service={service}"
    return text if platform is None else f"{text} platform={platform}"


def build_image(
    app: App,
    release: Release,
    platform: Platform | None = None,
    extra_layer: Layer | Sequence[Layer] | None = None,
    *,
    service: str | None = None,
) -> Image:
    """Build the image of ``release`` (for one of its platforms, if it has several).

    ``extra_layer`` (one layer or several) ends the image after its ``release.txt`` layer;
    ``service`` names the service for releases of several; without ``platform`` the image is
    for the platform of the app's device type.
    """
    tar, tar_gz = deterministic_tar_gz(
        {"release.txt": (release_text(app, release, platform, service) + "\n").encode()}
    )
    layers = [Layer(Descriptor.of(OCI_LAYER_GZIP, tar_gz), _sha256(tar), tar_gz)]
    if isinstance(extra_layer, Layer):
        layers.append(extra_layer)
    elif extra_layer is not None:
        layers.extend(extra_layer)
    target = platform or app.device_type.platform
    labels = {
        "io.balena.sandbox.app": app.slug,
        "io.balena.sandbox.commit": release.commit,
        "io.balena.sandbox.version": release.version,
    }
    if service is not None:
        labels["io.balena.sandbox.service"] = service
    config = _canonical_json(
        {
            **_platform_json(target),
            "created": _CREATED,
            "config": {"Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    )
    manifest = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor.of(OCI_CONFIG, config).to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
    )
    return Image(platform=target, config=config, layers=tuple(layers), manifest=manifest)


def build_index(images: Sequence[Image]) -> bytes:
    """Build the OCI image index referencing ``images`` by platform."""
    return _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [image.manifest_descriptor.to_json() for image in images],
        }
    )


# --------------------------------------------------------------------------- pushing


class _Pusher:
    """Registry v2 push operations over one authenticated session."""

    def __init__(self, session: aiohttp.ClientSession, registry_url: str, token: str) -> None:
        self._session = session
        self._base = registry_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def upload_blob(
        self, repository: str, digest: str, content: bytes | GeneratedLayer
    ) -> None:
        """POST an upload session, then finish it with one monolithic PUT ``?digest=``."""
        start_url = f"{self._base}/v2/{repository}/blobs/uploads/"
        async with self._session.post(start_url, headers=self._headers) as response:
            await _expect(response, 202, f"start upload of {digest} to {repository}")
            location = response.headers["Location"]
        # The Location already carries the upload state in its query; append, do not rebuild.
        separator = "&" if "?" in location else "?"
        put_url = URL(self._base).join(URL(f"{location}{separator}digest={digest}", encoded=True))
        body: bytes | AsyncIterator[bytes] = (
            content if isinstance(content, bytes) else _async_chunks(content)
        )
        headers = {**self._headers, "Content-Type": "application/octet-stream"}
        async with self._session.put(put_url, data=body, headers=headers) as response:
            await _expect(response, 201, f"upload {digest} to {repository}")

    async def put_manifest(
        self, repository: str, reference: str, media_type: str, body: bytes
    ) -> str:
        """PUT a manifest and return the digest the registry computed for it."""
        url = f"{self._base}/v2/{repository}/manifests/{reference}"
        headers = {**self._headers, "Content-Type": media_type}
        async with self._session.put(url, data=body, headers=headers) as response:
            await _expect(response, 201, f"put manifest {repository}:{reference}")
            digest = response.headers.get("Docker-Content-Digest", "")
        if digest != _sha256(body):
            raise SeedError(f"{repository}:{reference}: registry stored digest {digest!r}")
        return digest

    async def push_image(
        self, repository: str, image: Image, reference: str, uploaded: set[str]
    ) -> PushedManifest:
        """Upload the blobs ``image`` needs (once per repository) and put its manifest."""
        blobs: list[tuple[str, bytes | GeneratedLayer]] = [
            (layer.descriptor.digest, layer.content) for layer in image.layers
        ]
        blobs.append((image.config_descriptor.digest, image.config))
        for digest, content in blobs:
            if digest not in uploaded:
                await self.upload_blob(repository, digest, content)
                uploaded.add(digest)
        digest = await self.put_manifest(repository, reference, OCI_MANIFEST, image.manifest)
        return PushedManifest(
            digest=digest,
            media_type=OCI_MANIFEST,
            size=len(image.manifest),
            config_digest=image.config_descriptor.digest,
            layer_digests=tuple(layer.descriptor.digest for layer in image.layers),
        )


async def _async_chunks(layer: GeneratedLayer) -> AsyncIterator[bytes]:
    for chunk in layer.chunks():
        yield chunk


async def _expect(response: aiohttp.ClientResponse, status: int, action: str) -> None:
    if response.status != status:
        body = (await response.text())[:500]
        raise SeedError(f"{action}: HTTP {response.status}: {body}")


def _service_label(release: Release, image: ReleaseImage) -> str | None:
    # Images of single-service releases keep the bytes (and digests) they always had.
    return image.service if len(release.images) > 1 else None


def _images_of(
    app: App, release: Release, image: ReleaseImage, extra_layer: Sequence[Layer]
) -> list[Image]:
    """The single-platform images that make up ``image`` (one per platform of an index)."""
    service = _service_label(release, image)
    if not image.platforms:
        return [build_image(app, release, extra_layer=extra_layer, service=service)]
    return [build_image(app, release, p, extra_layer, service=service) for p in image.platforms]


@cache
def _measured(layer: GeneratedLayer) -> Layer:
    return layer.measure()


def _generated_layers(release: Release, image: ReleaseImage) -> list[GeneratedLayer]:
    """The big random layers of ``image``: the first seeded by the commit alone (the digests
    a single big layer always had), the next by ``<commit>/<n>``."""
    if not image.big_layer_mib:
        return []
    seeds = [release.commit, *(f"{release.commit}/{n}" for n in range(1, image.big_layers))]
    return [GeneratedLayer(seed=seed, size_mib=image.big_layer_mib) for seed in seeds]


def manifest_digest(app: App, release: Release, image: ReleaseImage) -> str:
    """The digest of ``image`` at ``latest`` once seeded: balena's ``image.content_hash``.

    Pure: the seeded bytes are a function of the catalog (a large layer is hashed once per
    process, which takes a fraction of a second).
    """
    extra = [_measured(layer) for layer in _generated_layers(release, image)]
    images = _images_of(app, release, image, extra)
    if not image.platforms:
        return images[0].manifest_descriptor.digest
    return _sha256(build_index(images))


async def _seed_image(
    pusher: _Pusher, app: App, release: Release, image: ReleaseImage
) -> SeededImage:
    extra_layer = [
        await asyncio.to_thread(generated.measure)
        for generated in _generated_layers(release, image)
    ]
    uploaded: set[str] = set()
    repository = image.repository
    images = _images_of(app, release, image, extra_layer)
    if not image.platforms:
        manifest = await pusher.push_image(repository, images[0], "latest", uploaded)
        return SeededImage(release.commit, repository, manifest, service=image.service)
    children: dict[str, PushedManifest] = {}
    for built in images:
        # Children go by digest: the registry checks that an index's manifests exist.
        reference = built.manifest_descriptor.digest
        children[str(built.platform)] = await pusher.push_image(
            repository, built, reference, uploaded
        )
    index = build_index(images)
    digest = await pusher.put_manifest(repository, "latest", OCI_INDEX, index)
    return SeededImage(
        release.commit,
        repository,
        PushedManifest(digest=digest, media_type=OCI_INDEX, size=len(index)),
        children,
        image.service,
    )


async def seed_registry(registry_url: str, catalog: Catalog, push_token: str) -> SeedResult:
    """Push every image of every release of ``catalog``, failed ones included.

    ``push_token`` must grant push on every image repository.
    """
    limit = asyncio.Semaphore(_PUSH_CONCURRENCY)

    async def bounded(
        pusher: _Pusher, app: App, release: Release, image: ReleaseImage
    ) -> SeededImage:
        async with limit:
            return await _seed_image(pusher, app, release, image)

    async with aiohttp.ClientSession() as session:
        pusher = _Pusher(session, registry_url, push_token)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(bounded(pusher, app, release, image))
                for app, release, image in catalog.all_images()
            ]
    seeded = [task.result() for task in tasks]
    return SeedResult({image.repository: image for image in seeded})
