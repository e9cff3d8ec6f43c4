"""The catalog as the balena API's v7 model shows it: resources, their rows, who may read them.

Field and navigation names, value shapes and read permissions follow open-balena-api
(``src/balena-model.ts``, ``src/features/ci-cd/models/release-additions.ts``, guest
permissions in ``config.ts``); values the catalog does not describe are fixed, plausible ones.
Everything here is pure: :func:`build_database` turns a catalog into rows once.
"""

from __future__ import annotations

import datetime
import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .catalog import CPU_ARCHITECTURES, App, Catalog, Release, ReleaseImage, User, can_read
from .seed import manifest_digest

__all__ = [
    "RESOURCES",
    "RESOURCE_NAMES",
    "Database",
    "Navigation",
    "Resource",
    "Row",
    "build_database",
]

Row = dict[str, Any]


@dataclass(frozen=True)
class Navigation:
    """A link to rows of ``target``: through this row's ``key`` field, or theirs (reverse)."""

    target: str
    key: str
    reverse: bool = False


@dataclass(frozen=True)
class Resource:
    """One resource of the v7 model, as far as the sandbox serves it.

    ``fields`` are what a request without ``$select`` gets, in the API's order; links to
    another row are fields too (``{"__id": N}`` unless expanded). ``synonyms`` are other names
    of fields. ``unmodelled`` are real navigations of the resource the sandbox has no rows
    for: naming one is outside what the stand-in can answer, not a mistake; those that are
    fields are listed in ``unmodelled_links``.
    """

    name: str
    fields: tuple[str, ...]
    navigations: Mapping[str, Navigation]
    synonyms: Mapping[str, str] = field(default_factory=dict)
    unmodelled: frozenset[str] = frozenset()
    unmodelled_links: frozenset[str] = frozenset()

    @property
    def links(self) -> frozenset[str]:
        """The fields that hold the id of another row."""
        forward = {n.key for n in self.navigations.values() if not n.reverse}
        return frozenset(forward) | self.unmodelled_links

    def field_name(self, name: str) -> str | None:
        """The field ``name`` stands for (itself or what it is a synonym of), if any."""
        resolved = self.synonyms.get(name, name)
        return resolved if resolved in self.fields else None


def _forward(target: str, key: str) -> Navigation:
    return Navigation(target, key)


def _reverse(target: str, key: str) -> Navigation:
    return Navigation(target, key, reverse=True)


_APPLICATION = Resource(
    name="application",
    fields=(
        "created_at",
        "modified_at",
        "id",
        "actor",
        "should_track_latest_release",
        "is_of__class",
        "organization",
        "app_name",
        "slug",
        "is_for__device_type",
        "should_be_running__release",
        "application_type",
        "is_host",
        "is_archived",
        "uuid",
        "is_public",
        "is_updated_by__application",
    ),
    navigations={
        "is_for__device_type": _forward("device_type", "is_for__device_type"),
        "should_be_running__release": _forward("release", "should_be_running__release"),
        "owns__release": _reverse("release", "belongs_to__application"),
        "service": _reverse("service", "application"),
        "application__has__service_name": _reverse("service", "application"),
    },
    unmodelled=frozenset(
        {
            "actor",
            "organization",
            "application_type",
            "is_updated_by__application",
            "updates__application",
            "owns__device",
            "application_tag",
            "application__has__tag_key",
            "application_environment_variable",
            "application__has__env_var_name",
            "application_config_variable",
            "application__has__config_var_name",
            "application_profile",
            "application__activates__profile_name__on__application",
            "activates__profile_name__on__application",
            "is_directly_accessible_by__user",
        }
    ),
    unmodelled_links=frozenset(
        {"actor", "organization", "application_type", "is_updated_by__application"}
    ),
)

_RELEASE = Resource(
    name="release",
    fields=(
        "created_at",
        "modified_at",
        "id",
        "belongs_to__application",
        "commit",
        "composition",
        "status",
        "source",
        "build_log",
        "is_invalidated",
        "start_timestamp",
        "end_timestamp",
        "update_timestamp",
        "release_version",
        "contract",
        "is_passing_tests",
        "is_finalized_at__date",
        "phase",
        "semver_major",
        "semver_minor",
        "semver_patch",
        "semver_prerelease",
        "semver_build",
        "variant",
        "revision",
        "known_issue_list",
        "note",
        "invalidation_reason",
        "is_final",
        "semver",
        "raw_version",
        "version",
    ),
    navigations={
        "belongs_to__application": _forward("application", "belongs_to__application"),
        "release_image": _reverse("release_image", "is_part_of__release"),
        "image__is_part_of__release": _reverse("release_image", "is_part_of__release"),
        "contains__image": _reverse("release_image", "is_part_of__release"),
        "should_be_running_on__application": _reverse("application", "should_be_running__release"),
    },
    unmodelled=frozenset(
        {
            "release_tag",
            "release__has__tag_key",
            "release_asset",
            "release__has__asset_key",
            "should_be_running_on__device",
            "is_running_on__device",
            "is_pinned_to__device",
            "should_operate__device",
            "should_manage__device",
            "provides__device__installs__image",
            "provides__image_install",
        }
    ),
)

_RELEASE_IMAGE = Resource(
    name="release_image",
    fields=("created_at", "modified_at", "image", "is_part_of__release", "id"),
    navigations={
        "image": _forward("image", "image"),
        "contains__image": _forward("image", "image"),
        "is_part_of__release": _forward("release", "is_part_of__release"),
        "release": _forward("release", "is_part_of__release"),
    },
    synonyms={"contains__image": "image", "release": "is_part_of__release"},
    unmodelled=frozenset(
        {
            "image_label",
            "release_image__has__label_name",
            "image__is_part_of__release__has__label_name",
            "image_profile",
            "release_image__has__profile_name",
            "image__is_part_of__release__has__profile_name",
            "image_environment_variable",
            "release_image__has__name",
            "image__is_part_of__release__has__name",
        }
    ),
)

_IMAGE = Resource(
    name="image",
    fields=(
        "created_at",
        "modified_at",
        "id",
        "start_timestamp",
        "end_timestamp",
        "dockerfile",
        "is_a_build_of__service",
        "image_size",
        "is_stored_at__image_location",
        "project_type",
        "error_message",
        "build_log",
        "push_timestamp",
        "status",
        "content_hash",
        "contract",
    ),
    navigations={
        "is_a_build_of__service": _forward("service", "is_a_build_of__service"),
        "is_a_build_of__application__has__service_name": _forward(
            "service", "is_a_build_of__service"
        ),
        "release_image": _reverse("release_image", "image"),
        "image__is_part_of__release": _reverse("release_image", "image"),
        "is_part_of__release": _reverse("release_image", "image"),
    },
    synonyms={"is_a_build_of__application__has__service_name": "is_a_build_of__service"},
    unmodelled=frozenset({"image_install", "device__installs__image", "is_installed_on__device"}),
)

_SERVICE = Resource(
    name="service",
    fields=("created_at", "modified_at", "application", "service_name", "id"),
    navigations={
        "application": _forward("application", "application"),
        "is_built_by__image": _reverse("image", "is_a_build_of__service"),
    },
    unmodelled=frozenset(
        {
            "service_label",
            "service__has__label_name",
            "application__has__service_name__has__label_name",
            "service_environment_variable",
            "service__has__name",
            "application__has__service_name__has__name",
            "service_install",
            "device__installs__service",
            "device__installs__application__has__service_name",
            "is_installed_on__device",
            "device_service_environment_variable",
            "device__has__service_environment_variable",
            "device__has__service__has__name",
            "device__has__application__has__service_name__has__name",
        }
    ),
)

_DEVICE_TYPE = Resource(
    name="device_type",
    fields=(
        "created_at",
        "modified_at",
        "id",
        "slug",
        "name",
        "is_of__cpu_architecture",
        "logo",
        "contract",
        "belongs_to__device_family",
    ),
    navigations={
        "is_of__cpu_architecture": _forward("cpu_architecture", "is_of__cpu_architecture"),
        "supports__cpu_architecture": _forward("cpu_architecture", "is_of__cpu_architecture"),
        "is_default_for__application": _reverse("application", "is_for__device_type"),
    },
    synonyms={"supports__cpu_architecture": "is_of__cpu_architecture"},
    unmodelled=frozenset(
        {
            "belongs_to__device_family",
            "device",
            "describes__device",
            "device_type_alias",
            "is_referenced_by__alias",
            "device_type__is_referenced_by__alias",
        }
    ),
    unmodelled_links=frozenset({"belongs_to__device_family"}),
)

_CPU_ARCHITECTURE = Resource(
    name="cpu_architecture",
    fields=("created_at", "modified_at", "id", "slug"),
    navigations={
        "device_type": _reverse("device_type", "is_of__cpu_architecture"),
        "is_supported_by__device_type": _reverse("device_type", "is_of__cpu_architecture"),
    },
)

RESOURCES: Mapping[str, Resource] = {
    r.name: r
    for r in (
        _APPLICATION,
        _RELEASE,
        _RELEASE_IMAGE,
        _IMAGE,
        _SERVICE,
        _DEVICE_TYPE,
        _CPU_ARCHITECTURE,
    )
}
# The names a request may use for a resource: "release_image" is the term form of
# "image__is_part_of__release" in the balena model.
RESOURCE_NAMES: Mapping[str, str] = {
    **{name: name for name in RESOURCES},
    "image__is_part_of__release": "release_image",
}


@dataclass(frozen=True)
class Database:
    """Every row of every resource, and which application each row's visibility follows."""

    rows: Mapping[str, tuple[Row, ...]]
    # Per resource: row id -> id of the application whose readability decides the row's.
    owners: Mapping[str, Mapping[int, int]]
    apps: Mapping[int, App]

    def row(self, resource: str, row_id: int) -> Row | None:
        """The row of ``resource`` with ``row_id``."""
        return next((r for r in self.rows[resource] if r["id"] == row_id), None)

    def visible(self, user: User | None) -> dict[str, frozenset[int]]:
        """Per resource, the ids ``user`` (``None``: a guest) may read.

        Guests read public applications and everything of theirs; a user also reads the
        applications of the organizations they belong to (balenaCloud's rule; open-balena
        lets every user read every application). Device types and cpu architectures are
        readable by anyone.
        """
        readable_apps = {i for i, app in self.apps.items() if can_read(app, user)}
        return {
            name: frozenset(
                r["id"]
                for r in rows
                if name not in self.owners or self.owners[name][r["id"]] in readable_apps
            )
            for name, rows in self.rows.items()
        }


# Fixed times keep every answer identical from one run to the next.
_EPOCH = datetime.datetime(2023, 11, 1, tzinfo=datetime.UTC)
_BUILD_TIME = datetime.timedelta(minutes=1)


def _created(release: Release, index: int) -> datetime.datetime:
    if not release.is_final:
        # A draft's raw version ends in its creation time in milliseconds (release-additions.ts).
        milliseconds = int(release.raw_version.rsplit("-", 1)[1])
        return datetime.datetime.fromtimestamp(milliseconds / 1000, datetime.UTC)
    return _EPOCH + datetime.timedelta(hours=index)


def _release_row(release: Release, row_id: int, app_id: int, created: datetime.datetime) -> Row:
    major, minor, patch = (int(part) for part in release.semver.split("."))
    finished = None if release.status == "running" else created + _BUILD_TIME
    build = [f"rev{release.revision}"] if release.is_final and release.revision > 0 else []
    services = {
        image.service: {"build": "." if len(release.images) == 1 else f"./{image.service}"}
        for image in release.images
    }
    return {
        "created_at": created,
        "modified_at": finished or created,
        "id": row_id,
        "belongs_to__application": app_id,
        "commit": release.commit,
        "composition": {"version": "2.1", "services": services},
        "status": str(release.status),
        "source": "cloud",
        "build_log": None,
        "is_invalidated": release.invalidated,
        "start_timestamp": created,
        "end_timestamp": finished,
        "update_timestamp": finished or created,
        "release_version": None,
        "contract": None,
        "is_passing_tests": True,
        "is_finalized_at__date": finished if release.is_final else None,
        "phase": None,
        "semver_major": major,
        "semver_minor": minor,
        "semver_patch": patch,
        "semver_prerelease": "",
        "semver_build": "",
        "variant": "",
        "revision": release.revision if release.is_final else None,
        "known_issue_list": None,
        "note": None,
        "invalidation_reason": None,
        "is_final": release.is_final,
        "semver": release.semver,
        "raw_version": release.raw_version,
        "version": {
            "raw": release.raw_version,
            "major": major,
            "minor": minor,
            "patch": patch,
            "prerelease": [] if release.is_final else [int(created.timestamp() * 1000)],
            "build": build,
            "version": release.semver if release.is_final else release.raw_version,
        },
    }


def _image_row(
    app: App,
    release: Release,
    image: ReleaseImage,
    row_id: int,
    service_id: int,
    created: datetime.datetime,
    registry_host: str,
) -> Row:
    finished = None if release.status == "running" else created + _BUILD_TIME
    return {
        "created_at": created,
        "modified_at": finished or created,
        "id": row_id,
        "start_timestamp": created,
        "end_timestamp": finished,
        "dockerfile": None,
        "is_a_build_of__service": service_id,
        "image_size": None,
        "is_stored_at__image_location": f"{registry_host}/{image.repository}",
        "project_type": "dockerfile",
        "error_message": None,
        "build_log": None,
        "push_timestamp": finished,
        # An image's status is its release's: the sandbox builds releases as a whole.
        "status": str(release.status),
        "content_hash": manifest_digest(app, release, image),
        "contract": None,
    }


def build_database(catalog: Catalog, registry_host: str) -> Database:
    """The rows of ``catalog``; image locations are on ``registry_host`` (REGISTRY2_HOST)."""
    rows: dict[str, list[Row]] = defaultdict(list)
    owners: dict[str, dict[int, int]] = defaultdict(dict)
    for arch_id, slug in enumerate(CPU_ARCHITECTURES, 1):
        rows["cpu_architecture"].append(
            {"created_at": _EPOCH, "modified_at": _EPOCH, "id": arch_id, "slug": slug}
        )
    for type_id, device_type in enumerate(catalog.device_types, 1):
        rows["device_type"].append(
            {
                "created_at": _EPOCH,
                "modified_at": _EPOCH,
                "id": type_id,
                "slug": device_type.slug,
                "name": device_type.name,
                "is_of__cpu_architecture": CPU_ARCHITECTURES.index(device_type.cpu_architecture)
                + 1,
                "logo": None,
                "contract": None,
                "belongs_to__device_family": None,
            }
        )
    type_ids = {d.slug: i for i, d in enumerate(catalog.device_types, 1)}
    org_ids = {org.handle: i for i, org in enumerate(catalog.orgs, 1)}
    release_ids = {r.commit: i for i, (_, r) in enumerate(catalog.all_releases(), 1)}
    apps = dict(enumerate(catalog.apps, 1))
    service_ids: dict[tuple[int, str], int] = {}
    image_id = 0
    for app_id, app in apps.items():
        created = _EPOCH + datetime.timedelta(days=app_id)
        rows["application"].append(
            _application_row(app, app_id, created, org_ids, type_ids, release_ids)
        )
        for index, release in enumerate(app.releases):
            release_id = release_ids[release.commit]
            release_created = _created(release, index)
            rows["release"].append(_release_row(release, release_id, app_id, release_created))
            owners["release"][release_id] = app_id
            for image in release.images:
                if (app_id, image.service) not in service_ids:
                    service_id = len(service_ids) + 1
                    service_ids[app_id, image.service] = service_id
                    rows["service"].append(
                        {
                            "created_at": created,
                            "modified_at": created,
                            "application": app_id,
                            "service_name": image.service,
                            "id": service_id,
                        }
                    )
                    owners["service"][service_id] = app_id
                image_id += 1
                rows["image"].append(
                    _image_row(
                        app,
                        release,
                        image,
                        image_id,
                        service_ids[app_id, image.service],
                        release_created,
                        registry_host,
                    )
                )
                # One release_image per image: the sandbox never shares an image between
                # releases, so the two share ids.
                rows["release_image"].append(
                    {
                        "created_at": release_created,
                        "modified_at": release_created,
                        "image": image_id,
                        "is_part_of__release": release_id,
                        "id": image_id,
                    }
                )
                owners["image"][image_id] = app_id
                owners["release_image"][image_id] = app_id
        owners["application"][app_id] = app_id
    return Database(
        rows={name: tuple(rows[name]) for name in RESOURCES},
        owners={name: dict(ids) for name, ids in owners.items()},
        apps=apps,
    )


def _application_row(
    app: App,
    app_id: int,
    created: datetime.datetime,
    org_ids: Mapping[str, int],
    type_ids: Mapping[str, int],
    release_ids: Mapping[str, int],
) -> Row:
    return {
        "created_at": created,
        "modified_at": created,
        "id": app_id,
        # Actors number users, apps and devices alike; apps come after a few users.
        "actor": 100 + app_id,
        # The catalog pins every app explicitly, so none tracks its latest release.
        "should_track_latest_release": False,
        "is_of__class": "fleet",
        "organization": org_ids[app.org],
        "app_name": app.name,
        "slug": app.slug,
        "is_for__device_type": type_ids[app.device_type.slug],
        "should_be_running__release": (
            None if app.pinned_commit is None else release_ids[app.pinned_commit]
        ),
        "application_type": 1,
        "is_host": False,
        "is_archived": False,
        "uuid": hashlib.md5(app.slug.encode(), usedforsecurity=False).hexdigest(),
        "is_public": app.public,
        "is_updated_by__application": None,
    }
