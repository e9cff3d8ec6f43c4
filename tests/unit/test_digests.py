"""What the cache can verify, and the manifest size it keeps."""

from __future__ import annotations

import re
from pathlib import Path

from balena_registry_proxy.digests import MAX_MANIFEST_BYTES


def test_manifests_are_kept_up_to_the_4_mib_the_readme_says() -> None:
    # Distribution's own limit on a manifest body (defaultMaxManifestBodySize, 4 << 20).
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    promise = re.search(r"manifests\s+fetched by digest \(up to (\d+) MiB\)", readme)
    assert promise is not None
    assert int(promise[1]) * 1024 * 1024 == MAX_MANIFEST_BYTES == 4_194_304
