"""The banner's list of apps: which release is pinned, and which never resolve."""

from __future__ import annotations

import dataclasses

from balena_registry_proxy.sandbox import Catalog
from balena_registry_proxy.sandbox.catalog import ReleaseStatus
from balena_registry_proxy.sandbox.demo import apps_listing, release_label


def _line(listing: str, slug: str) -> str:
    (line,) = [line for line in listing.splitlines() if line.split()[0] == slug]
    return line


def test_the_default_catalog_marks_the_pinned_the_draft_and_the_failed(
    default_catalog: Catalog,
) -> None:
    web = _line(apps_listing(default_catalog), "gh_acme/web")
    releases = web.partition("releases: ")[2].split(", ")
    assert releases == [
        "1.2.3",
        "1.2.3+rev1 (pinned)",
        "1.2.3+rev2",
        "1.3.0",
        "1.4.0-1700000000000 (draft)",
        "1.5.0 (failed)",
    ]
    assert _line(apps_listing(default_catalog), "gh_acme/empty").endswith("releases: -")


def test_a_pinned_draft_says_both_and_a_running_build_is_marked(
    default_catalog: Catalog,
) -> None:
    web = default_catalog.app("gh_acme/web")
    assert web is not None
    draft = next(release for release in web.releases if not release.is_final)
    pinned_to_the_draft = dataclasses.replace(web, pinned_commit=draft.commit)
    assert release_label(pinned_to_the_draft, draft) == "1.4.0-1700000000000 (pinned, draft)"
    running = dataclasses.replace(web.releases[3], status=ReleaseStatus.RUNNING)
    assert release_label(web, running) == "1.3.0 (running)"
