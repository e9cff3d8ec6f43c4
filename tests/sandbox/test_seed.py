"""Deterministic image construction (no registry involved)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from typing import Any

import pytest

from balena_registry_proxy.sandbox.catalog import App, Catalog, Platform, Release, catalog_from_data
from balena_registry_proxy.sandbox.seed import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    GeneratedLayer,
    PushedManifest,
    SeededImage,
    SeedResult,
    build_image,
    build_index,
    deterministic_tar_gz,
    manifest_digest,
    release_text,
)

WEB_REV2 = "e8b6a13ac1443a731f1ad8fe7b6573f6"
MULTI = "df536a8c7e7306f41113f698a6a97911"


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        files: dict[str, bytes] = {}
        for member in archive.getmembers():
            extracted = archive.extractfile(member)
            assert extracted is not None
            files[member.name] = extracted.read()
        return files


@pytest.fixture
def web_rev2(default_catalog: Catalog) -> tuple[App, Release]:
    return default_catalog.release(WEB_REV2)


def test_tar_gz_is_deterministic() -> None:
    first = deterministic_tar_gz({"b.txt": b"b", "a.txt": b"a"})
    second = deterministic_tar_gz({"a.txt": b"a", "b.txt": b"b"})
    assert first == second
    tar, tar_gz = first
    assert gzip.decompress(tar_gz) == tar
    assert tar_gz[4:8] == b"\0\0\0\0"  # gzip header mtime
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert [m.mtime for m in archive.getmembers()] == [1700000000, 1700000000]
    assert untar(tar) == {"a.txt": b"a", "b.txt": b"b"}


def test_release_text(web_rev2: tuple[App, Release]) -> None:
    app, release = web_rev2
    assert release_text(app, release) == f"gh_acme/web commit={WEB_REV2} version=1.2.3+rev2"
    assert release_text(app, release, Platform("linux", "arm64")).endswith(" platform=linux/arm64")


def test_image_is_a_consistent_oci_image(web_rev2: tuple[App, Release]) -> None:
    image = build_image(*web_rev2)
    manifest: dict[str, Any] = json.loads(image.manifest)
    config: dict[str, Any] = json.loads(image.config)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": sha256(image.config),
        "size": len(image.config),
    }
    (layer,) = image.layers
    assert isinstance(layer.content, bytes)
    assert manifest["layers"] == [
        {"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer.content), "size": len(layer.content)}
    ]
    tar = gzip.decompress(layer.content)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256(tar)]}
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert untar(tar) == {"release.txt": release_text(*web_rev2).encode() + b"\n"}
    assert config["config"]["Labels"]["io.balena.sandbox.commit"] == WEB_REV2


def test_images_are_reproducible(web_rev2: tuple[App, Release]) -> None:
    assert build_image(*web_rev2) == build_image(*web_rev2)


def test_platform_images_differ_and_index_lists_them(default_catalog: Catalog) -> None:
    app, release = default_catalog.release(MULTI)
    assert release.single_image is not None
    platforms = release.single_image.platforms
    images = [build_image(app, release, platform) for platform in platforms]
    assert len({image.manifest_descriptor.digest for image in images}) == 2
    arm = json.loads(images[1].config)
    assert (arm["os"], arm["architecture"]) == ("linux", "arm64")
    index: dict[str, Any] = json.loads(build_index(images))
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(image.manifest),
            "size": len(image.manifest),
            "platform": {"architecture": str(p.architecture), "os": "linux"},
        }
        for image, p in zip(images, platforms, strict=True)
    ]


def test_variant_is_part_of_the_platform(web_rev2: tuple[App, Release]) -> None:
    image = build_image(*web_rev2, platform=Platform("linux", "arm", "v7"))
    assert json.loads(image.config)["variant"] == "v7"
    assert image.manifest_descriptor.to_json()["platform"] == {
        "architecture": "arm",
        "os": "linux",
        "variant": "v7",
    }


def test_generated_layer_streams_what_it_measures() -> None:
    generated = GeneratedLayer(seed="s", size_mib=2, chunk_size=64 * 1024)
    layer = generated.measure()
    blob = b"".join(generated.chunks())
    assert layer.descriptor.digest == sha256(blob)
    assert layer.descriptor.size == len(blob)
    assert layer.descriptor.media_type == OCI_LAYER_GZIP
    tar = gzip.decompress(blob)
    assert layer.diff_id == sha256(tar)
    content = untar(tar)["random.bin"]
    assert len(content) == 2 * 1024 * 1024
    # Every chunk is distinct, not one block repeated.
    assert len({content[i : i + 64 * 1024] for i in range(0, len(content), 64 * 1024)}) == 32
    assert max(len(chunk) for chunk in generated.chunks()) <= 64 * 1024 + 1024


def test_generated_layer_depends_on_seed_only() -> None:
    first = GeneratedLayer(seed="a", size_mib=1).measure()
    assert first == GeneratedLayer(seed="a", size_mib=1).measure()
    assert first.descriptor != GeneratedLayer(seed="b", size_mib=1).measure().descriptor


def test_extra_layer_is_appended(web_rev2: tuple[App, Release]) -> None:
    extra = GeneratedLayer(seed="x", size_mib=1).measure()
    image = build_image(*web_rev2, extra_layer=extra)
    assert image.layers[-1] == extra
    assert json.loads(image.config)["rootfs"]["diff_ids"][-1] == extra.diff_id


def test_seeded_release_layer_digests_include_children() -> None:
    child = PushedManifest("sha256:c", OCI_MANIFEST, 1, "sha256:cfg", ("sha256:l1",))
    seeded = SeededImage(
        "c" * 32,
        "v2/x",
        PushedManifest("sha256:i", OCI_INDEX, 2),
        {"linux/amd64": child},
    )
    result = SeedResult({seeded.repository: seeded})
    assert result["c" * 32].layer_digests == ("sha256:l1",)
    assert (seeded.digest, seeded.media_type) == ("sha256:i", OCI_INDEX)


STACK_100 = "b9998890955e1a80e7d30b4cbb1c414f"
BROWSER_AARCH64 = "96262b12bf6b6c66d4adc8fe12500d97"


def test_service_images_name_their_service(default_catalog: Catalog) -> None:
    app, release = default_catalog.release(STACK_100)
    built = {i.service: build_image(app, release, service=i.service) for i in release.images}
    assert len({image.manifest_descriptor.digest for image in built.values()}) == 3
    api = built["api"]
    (layer,) = api.layers
    assert isinstance(layer.content, bytes)
    text = untar(gzip.decompress(layer.content))["release.txt"].decode()
    assert text == f"gh_acme/stack commit={STACK_100} version=1.0.0 service=api\n"
    assert json.loads(api.config)["config"]["Labels"]["io.balena.sandbox.service"] == "api"


def test_single_service_images_keep_their_bytes(web_rev2: tuple[App, Release]) -> None:
    labels = json.loads(build_image(*web_rev2).config)["config"]["Labels"]
    assert "io.balena.sandbox.service" not in labels


def test_images_are_built_for_the_device_types_platform(default_catalog: Catalog) -> None:
    config = json.loads(build_image(*default_catalog.release(BROWSER_AARCH64)).config)
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")


def test_manifest_digest_is_what_seeding_puts_at_latest(default_catalog: Catalog) -> None:
    app, release = default_catalog.release(WEB_REV2)
    assert release.single_image is not None
    assert manifest_digest(app, release, release.single_image) == sha256(
        build_image(app, release).manifest
    )
    app, release = default_catalog.release(MULTI)
    image = release.single_image
    assert image is not None
    children = [build_image(app, release, p) for p in image.platforms]
    assert manifest_digest(app, release, image) == sha256(build_index(children))


def test_big_layers_end_the_image_the_first_as_a_single_one_was() -> None:
    def release_of(**fields: object) -> tuple[App, Release]:
        document = {
            "orgs": ["o"],
            "apps": [
                {"slug": "o/a", "releases": [{"commit": "a" * 32, "semver": "1.0.0", **fields}]}
            ],
        }
        return catalog_from_data(document).release("a" * 32)

    app, release = release_of(big_layer_mib=1, big_layers=3)
    image = release.single_image
    assert image is not None
    assert image.big_layers == 3
    one_app, one = release_of(big_layer_mib=1)
    assert one.single_image is not None
    assert one.single_image.big_layers == 1
    single = build_image(one_app, one, extra_layer=GeneratedLayer("a" * 32, 1).measure())
    digest = manifest_digest(app, release, image)
    layers = json.loads(_manifest_with_digest(app, release, digest))["layers"]
    assert len(layers) == 4
    assert layers[1] == json.loads(single.manifest)["layers"][1]
    assert len({layer["digest"] for layer in layers}) == 4
    assert manifest_digest(one_app, one, one.single_image) == sha256(single.manifest)


def _manifest_with_digest(app: App, release: Release, digest: str) -> bytes:
    """The manifest of ``release`` with a single image and its big layers, checked by digest."""
    seeds = [release.commit, *(f"{release.commit}/{n}" for n in (1, 2))]
    extra = [GeneratedLayer(seed, 1).measure() for seed in seeds]
    manifest = build_image(app, release, extra_layer=extra).manifest
    assert sha256(manifest) == digest
    return manifest


def test_seed_result_by_release_and_by_service() -> None:
    pushed = PushedManifest("sha256:m", OCI_MANIFEST, 1)
    single = SeededImage("a" * 32, "v2/a", pushed)
    web = SeededImage("b" * 32, "v2/b", pushed, service="web")
    db = SeededImage("b" * 32, "v2/c", pushed, service="db")
    result = SeedResult({i.repository: i for i in (single, web, db)})
    assert result.releases == {"a" * 32: single}
    assert result.services("b" * 32) == {"web": web, "db": db}
    with pytest.raises(KeyError):
        result["b" * 32]
