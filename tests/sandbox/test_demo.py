"""The banner's list of apps: which release is pinned, and which never resolve."""

from __future__ import annotations

from balena_registry_proxy.sandbox import Catalog
from balena_registry_proxy.sandbox.catalog import catalog_from_data
from balena_registry_proxy.sandbox.demo import apps_listing


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


def test_a_pinned_draft_says_both_and_a_running_build_is_marked() -> None:
    catalog = catalog_from_data(
        {
            "orgs": ["o"],
            "apps": [
                {
                    "slug": "o/a",
                    "public": True,
                    "pinned_release": "a" * 32,
                    "releases": [
                        {
                            "commit": "a" * 32,
                            "semver": "1.0.0",
                            "final": False,
                            "raw_version": "1.0.0-1700000000000",
                        },
                        {"commit": "b" * 32, "semver": "1.1.0", "status": "running"},
                    ],
                }
            ],
        }
    )
    assert _line(apps_listing(catalog), "o/a").endswith(
        "releases: 1.0.0-1700000000000 (pinned, draft), 1.1.0 (running)"
    )
