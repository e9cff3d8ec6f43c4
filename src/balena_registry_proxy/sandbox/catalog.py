"""The sandbox world (orgs, users, apps, releases) and balena's registry scope resolution rules.

Everything here is pure apart from :func:`load_catalog`, which only reads the file. The token
service turns the :class:`AccessEntry` values computed here into JWT ``access`` claims.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "CPU_ARCHITECTURES",
    "DEFAULT_DEVICE_TYPE",
    "DEFAULT_SELECTORS",
    "DEFAULT_SERVICE_NAME",
    "AccessEntry",
    "App",
    "Catalog",
    "CatalogError",
    "DeviceType",
    "Organization",
    "Platform",
    "Release",
    "ReleaseImage",
    "ReleaseStatus",
    "ScopeRequest",
    "User",
    "access_for_scopes",
    "can_read",
    "catalog_from_data",
    "default_catalog_path",
    "derive_repository_hash",
    "load_catalog",
    "parse_scope",
    "resolve_release",
    "resolve_scope",
]

# Selectors that mean "whatever release the app is pinned to", not "the newest release".
DEFAULT_SELECTORS = frozenset({"latest", "current", "default", "pinned"})
# The service name of a release described without `services`, as balena names a lone service.
DEFAULT_SERVICE_NAME = "main"
# balena's cpu_architecture slugs (API src/balena.sbvr), in the order the sandbox numbers them.
CPU_ARCHITECTURES = ("rpi", "armv7hf", "aarch64", "i386-nlp", "i386", "amd64")

_APP_NAME_RE = re.compile(r"^([a-z0-9_-]+)/([a-z0-9_-]+)(?:/([a-z0-9_.-]+))?(?:/([a-z0-9_-]+))?$")
_DIRECT_NAME_RE = re.compile(r"^v2/([0-9a-f]{32})$")
_HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
_PULL = "pull"


class CatalogError(ValueError):
    """The catalog file is unreadable or describes an inconsistent world."""


class ReleaseStatus(enum.StrEnum):
    """Build status of a release (balena's six); only successful ones are resolved by name."""

    SUCCESS = "success"
    FAILED = "failed"
    RUNNING = "running"
    ERROR = "error"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Platform:
    """An OCI platform such as ``linux/arm64`` or ``linux/arm/v7``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/architecture[/variant]`` (already checked by the catalog schema)."""
        os_name, architecture, *variant = text.split("/")
        return cls(os=os_name, architecture=architecture, variant=variant[0] if variant else None)

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return base if self.variant is None else f"{base}/{self.variant}"


# balena-compose's resolveDockerPlatform: the platform an image built for an architecture has.
_ARCHITECTURE_PLATFORMS = {
    "rpi": Platform("linux", "arm", "v6"),
    "armv7hf": Platform("linux", "arm", "v7"),
    "aarch64": Platform("linux", "arm64", "v8"),
    "i386-nlp": Platform("linux", "386"),
    "i386": Platform("linux", "386"),
    "amd64": Platform("linux", "amd64"),
}


@dataclass(frozen=True)
class DeviceType:
    """A balena device type; an app is for exactly one, and it for one cpu architecture."""

    slug: str
    name: str
    cpu_architecture: str

    @property
    def platform(self) -> Platform:
        """The OCI platform of images built for this device type."""
        return _ARCHITECTURE_PLATFORMS[self.cpu_architecture]


# What an app is for when the catalog does not say.
DEFAULT_DEVICE_TYPE = DeviceType("generic-amd64", "Generic x86_64 (GPT)", "amd64")


@dataclass(frozen=True)
class Organization:
    """A balena organization, identified by its lowercase handle."""

    handle: str


@dataclass(frozen=True)
class User:
    """A balena user; the API key is what the registry client sends as its Basic password."""

    username: str
    api_key: str = field(repr=False)
    orgs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReleaseImage:
    """The image of one service in a release; it lives in the registry at :attr:`repository`."""

    service: str
    repository_hash: str
    platforms: tuple[Platform, ...] = ()
    big_layer_mib: int = 0
    # How many random layers of ``big_layer_mib`` MiB the image ends with.
    big_layers: int = 1

    @property
    def repository(self) -> str:
        """The opaque registry repository name, ``v2/<hash>``."""
        return f"v2/{self.repository_hash}"


@dataclass(frozen=True)
class Release:
    """One release of an app: one image per service."""

    commit: str
    semver: str
    revision: int
    is_final: bool
    raw_version: str
    status: ReleaseStatus
    images: tuple[ReleaseImage, ...]
    invalidated: bool = False

    @property
    def single_image(self) -> ReleaseImage | None:
        """The release's image when it has exactly one, the only kind resolved by name."""
        return self.images[0] if len(self.images) == 1 else None

    @property
    def version(self) -> str:
        """Human version: ``1.2.3``, ``1.2.3+rev2`` for finals, the raw version for drafts."""
        if not self.is_final:
            return self.raw_version
        return self.semver if self.revision == 0 else f"{self.semver}+rev{self.revision}"


@dataclass(frozen=True)
class App:
    """An application (balena "fleet") and its releases."""

    org: str
    name: str
    public: bool
    pinned_commit: str | None
    releases: tuple[Release, ...]
    device_type: DeviceType = DEFAULT_DEVICE_TYPE

    @property
    def slug(self) -> str:
        """``org/app``, the name users pull by."""
        return f"{self.org}/{self.name}"

    @property
    def pinned_release(self) -> Release | None:
        """The release the app tracks, if any."""
        return next((r for r in self.releases if r.commit == self.pinned_commit), None)


@dataclass(frozen=True)
class Catalog:
    """The whole sandbox world."""

    orgs: tuple[Organization, ...]
    users: tuple[User, ...]
    apps: tuple[App, ...]
    device_types: tuple[DeviceType, ...] = (DEFAULT_DEVICE_TYPE,)

    def app(self, slug: str) -> App | None:
        """Return the app whose slug is ``slug``."""
        return next((a for a in self.apps if a.slug == slug), None)

    def user(self, username: str) -> User | None:
        """Return the user called ``username``."""
        return next((u for u in self.users if u.username == username), None)

    def user_by_api_key(self, api_key: str) -> User | None:
        """Return the owner of ``api_key``."""
        # Constant-time comparison: the sandbox should not model a timing oracle.
        candidate = api_key.encode()
        return next(
            (u for u in self.users if hmac.compare_digest(u.api_key.encode(), candidate)), None
        )

    def release(self, commit: str) -> tuple[App, Release]:
        """Return the release with ``commit`` and its app; raise :class:`KeyError` if unknown."""
        for app in self.apps:
            for release in app.releases:
                if release.commit == commit:
                    return app, release
        raise KeyError(commit)

    def image_by_hash(self, repository_hash: str) -> tuple[App, Release, ReleaseImage] | None:
        """Return the image stored at ``v2/<repository_hash>``, its release and its app."""
        return next(
            (found for found in self.all_images() if found[2].repository_hash == repository_hash),
            None,
        )

    def all_releases(self) -> list[tuple[App, Release]]:
        """Every release of every app, whatever its status."""
        return [(app, release) for app in self.apps for release in app.releases]

    def all_images(self) -> list[tuple[App, Release, ReleaseImage]]:
        """Every image of every release, whatever its status, in catalog order."""
        return [
            (app, release, image)
            for app, release in self.all_releases()
            for image in release.images
        ]


# --------------------------------------------------------------------------- scope resolution
@dataclass(frozen=True)
class ScopeRequest:
    """A parsed ``repository:<name>:<actions>`` scope; tag or digest suffixes are dropped."""

    name: str
    actions: tuple[str, ...]


@dataclass(frozen=True)
class AccessEntry:
    """One entry of the token's ``access`` claim."""

    name: str
    actions: tuple[str, ...]
    alias: str | None = None
    type: str = "repository"

    def to_claim(self) -> dict[str, Any]:
        """Render as the JSON object the registry reads."""
        claim: dict[str, Any] = {"type": self.type, "name": self.name}
        if self.alias is not None:
            claim["alias"] = self.alias
        claim["actions"] = list(self.actions)
        return claim


def parse_scope(scope: str) -> ScopeRequest | None:
    """Parse a registry scope string; return ``None`` for anything but a repository scope."""
    kind, sep, rest = scope.partition(":")
    if kind != "repository" or not sep:
        return None
    name, sep, actions = rest.rpartition(":")
    # Clients may address a tag or digest (`name:tag`, `name@sha256:...`); access is per name.
    name = name.split("@", 1)[0].split(":", 1)[0]
    if not sep or not name:
        return None
    return ScopeRequest(name=name, actions=tuple(a for a in actions.split(",") if a))


def can_read(app: App, user: User | None) -> bool:
    """Public apps are readable by anyone; private ones by members of the app's org."""
    return app.public or (user is not None and app.org in user.orgs)


def resolve_release(app: App, selector: str | None, *, single_image: bool = True) -> Release | None:
    """Pick the successful release of ``app`` that ``selector`` designates, if any.

    The balena API's registry resolution only ever considers releases with one image
    (``release_image/$count eq 1`` in its query); ``single_image=False`` lifts that rule and
    picks among all successful releases, as a client resolving services itself would.
    """
    candidates = [
        r
        for r in app.releases
        if r.status is ReleaseStatus.SUCCESS and (len(r.images) == 1 or not single_image)
    ]
    if selector is None or selector in DEFAULT_SELECTORS:
        pinned = app.pinned_release
        return pinned if pinned in candidates else None
    if _HEX32_RE.match(selector):
        return next((r for r in candidates if r.commit == selector), None)
    finals = [r for r in candidates if r.is_final and r.semver == selector]
    if finals:
        return max(finals, key=lambda r: r.revision)
    return next((r for r in candidates if not r.is_final and r.raw_version == selector), None)


def resolve_scope(catalog: Catalog, request: ScopeRequest, user: User | None) -> AccessEntry | None:
    """Apply balena's rules to one repository scope; ``None`` means the scope is ignored."""
    # The registry only ever gets pull rights from the API; pushes come from the builders.
    pull = (_PULL,) if _PULL in request.actions else ()
    direct = _DIRECT_NAME_RE.match(request.name)
    if direct is not None:
        found = catalog.image_by_hash(direct[1])
        readable = found is not None and can_read(found[0], user)
        return AccessEntry(name=request.name, actions=pull if readable else ())
    match = _APP_NAME_RE.match(request.name)
    if match is None:
        return None
    org, app_name, selector, service = match.groups()
    if service is not None:
        # Multi-service pulls are not supported: the name is acknowledged, nothing is granted.
        return AccessEntry(name=request.name, actions=())
    app = catalog.app(f"{org}/{app_name}")
    release = resolve_release(app, selector) if app is not None and can_read(app, user) else None
    image = None if release is None else release.single_image
    if image is not None:
        return AccessEntry(name=image.repository, actions=pull, alias=request.name)
    if selector is None:
        # Legacy behaviour: grant the literal name, which does not exist in the registry.
        return AccessEntry(name=request.name, actions=pull)
    return AccessEntry(name=request.name, actions=())


def access_for_scopes(
    catalog: Catalog, scopes: Iterable[str], user: User | None
) -> list[AccessEntry]:
    """Resolve every scope string, dropping the ones balena ignores."""
    entries: list[AccessEntry] = []
    for scope in scopes:
        request = parse_scope(scope)
        entry = None if request is None else resolve_scope(catalog, request, user)
        if entry is not None:
            entries.append(entry)
    return entries


# --------------------------------------------------------------------------- loading/validation


def derive_repository_hash(app_slug: str, commit: str) -> str:
    """Deterministic repository hash for a release whose catalog entry gives none."""
    return hashlib.sha256(f"{app_slug}/{commit}".encode()).hexdigest()[:32]


def default_catalog_path() -> Path:
    """Path of the catalog shipped with the package (see ``default_catalog.yaml``)."""
    return Path(__file__).with_name("default_catalog.yaml")


def load_catalog(path: Path | str) -> Catalog:
    """Read and validate a catalog from a YAML or JSON (``.json``) file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror}") from exc
    try:
        data: object = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise CatalogError(f"{path}: not valid {kind}: {exc}") from exc
    try:
        return catalog_from_data(data)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from exc


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(Path(__file__).with_name("catalog.schema.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _where(path: Iterable[str | int]) -> str:
    return "catalog" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


_TYPE_MESSAGES = {
    # YAML turns unquoted 1.2 or all-digit hex into numbers; say how to fix it.
    "string": "must be a string (quote it in YAML)",
    "boolean": "must be true or false",
    "integer": "must be a non-negative integer",
}


def _schema_message(error: jsonschema.ValidationError) -> str:
    """One line naming where ``error`` is and what to write instead."""
    where = _where(error.absolute_path)
    # The typeshed stubs allow "unset" for these; a raised error always has them.
    instance: Any = error.instance
    schema: Any = error.schema
    value: Any = error.validator_value
    if error.validator == "type":
        if value in _TYPE_MESSAGES:
            return f"{where}: {_TYPE_MESSAGES[value]}, got {instance!r}"
        expected = {"object": "expected a mapping", "array": "must be a list"}
        return f"{where}: {expected[value]}, got {type(instance).__name__}"
    if error.validator == "minimum":
        wanted = _TYPE_MESSAGES["integer"] if value == 0 else f"must be an integer >= {value}"
        return f"{where}: {wanted}, got {instance!r}"
    if error.validator == "additionalProperties":
        unknown = sorted(str(key) for key in instance if key not in schema["properties"])
        return f"{where}: unknown key(s) {', '.join(unknown)}"
    if error.validator == "required":
        missing = next(key for key in value if key not in instance)
        return f"{where}.{missing}: is required"
    if error.validator == "uniqueItems":
        return f"{where}: lists {schema['title']} twice"
    if error.validator == "enum":
        return f"{where}: {instance!r} is not one of {', '.join(value)}"
    if "description" in schema:
        return f"{where}: {instance!r} is not {schema['description']}"
    return f"{where}: {error.message}"


def catalog_from_data(data: object) -> Catalog:
    """Validate already-parsed YAML/JSON data and build the :class:`Catalog`."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        raise CatalogError(_schema_message(error))
    assert isinstance(data, Mapping)  # the schema's top-level "type": "object"
    return _build_catalog(data)


def _twice(values: Iterable[object]) -> bool:
    return any(count > 1 for count in Counter(values).values())


def _build_catalog(data: Mapping[str, Any]) -> Catalog:
    """The catalog from schema-valid ``data``, checking the rules that relate entries."""
    handles: list[str] = data.get("orgs", [])
    users: list[User] = []
    for i, item in enumerate(data.get("users", [])):
        for org in item.get("orgs", []):
            if org not in handles:
                where = _where(("users", i, "orgs"))
                raise CatalogError(f"{where}: organization {org!r} is not declared in orgs")
        users.append(User(item["username"], item["api_key"], frozenset(item.get("orgs", []))))
    if _twice(u.username for u in users):
        raise CatalogError("catalog.users: two users share a username")
    if _twice(u.api_key for u in users):
        raise CatalogError("catalog.users: two users share an api_key")
    device_types = tuple(
        DeviceType(d["slug"], d["name"], d["cpu_architecture"])
        for d in data.get("device_types", [])
    ) or (DEFAULT_DEVICE_TYPE,)
    if _twice(d.slug for d in device_types):
        raise CatalogError("catalog.device_types: two device types share a slug")
    apps = tuple(
        _build_app(item, ("apps", i), set(handles), device_types)
        for i, item in enumerate(data.get("apps", []))
    )
    if _twice(a.slug for a in apps):
        raise CatalogError("catalog.apps: two apps share a slug")
    releases = [r for a in apps for r in a.releases]
    if _twice(r.commit for r in releases):
        raise CatalogError("catalog.apps: two releases share a commit")
    if _twice(image.repository_hash for r in releases for image in r.images):
        raise CatalogError("catalog.apps: two images share a repository hash")
    return Catalog(
        orgs=tuple(Organization(h) for h in handles),
        users=tuple(users),
        apps=apps,
        device_types=device_types,
    )


def _build_app(
    data: Mapping[str, Any],
    path: tuple[str | int, ...],
    orgs: set[str],
    device_types: Sequence[DeviceType],
) -> App:
    where = _where(path)
    slug: str = data["slug"]
    org, name = slug.split("/")
    if org not in orgs:
        raise CatalogError(f"{where}.slug: organization {org!r} is not declared in orgs")
    slug_of_type: str = data.get("device_type", device_types[0].slug)
    device_type = next((d for d in device_types if d.slug == slug_of_type), None)
    if device_type is None:
        message = f"{slug_of_type!r} is not declared in device_types"
        raise CatalogError(f"{where}.device_type: {message}")
    releases = tuple(
        _build_release(item, (*path, "releases", i), slug)
        for i, item in enumerate(data.get("releases", []))
    )
    if _twice((r.semver, r.revision) for r in releases if r.is_final):
        raise CatalogError(f"{where}.releases: two final releases share a semver and revision")
    if _twice(r.raw_version for r in releases if not r.is_final):
        raise CatalogError(f"{where}.releases: two drafts share a raw_version")
    pinned: str | None = data.get("pinned_release")
    if pinned is not None:
        target = next((r for r in releases if r.commit == pinned), None)
        if target is None:
            raise CatalogError(f"{where}.pinned_release: {pinned} is not a release of {slug}")
        if target.status is not ReleaseStatus.SUCCESS:
            message = f"{pinned} did not succeed ({target.status})"
            raise CatalogError(f"{where}.pinned_release: {message}")
    return App(
        org=org,
        name=name,
        public=data.get("public", False),
        pinned_commit=pinned,
        releases=releases,
        device_type=device_type,
    )


def _build_release(data: Mapping[str, Any], path: tuple[str | int, ...], app_slug: str) -> Release:
    where = _where(path)
    commit: str = data["commit"]
    semver: str = data["semver"]
    is_final: bool = data.get("final", True)
    revision: int = data.get("revision", 0)
    if is_final:
        if "raw_version" in data:
            raise CatalogError(
                f"{where}.raw_version: only drafts (final: false) have a raw_version"
            )
        raw_version = semver if revision == 0 else f"{semver}+rev{revision}"
    else:
        if revision != 0:
            raise CatalogError(f"{where}.revision: drafts (final: false) have no revision")
        if "raw_version" not in data:
            raise CatalogError(f"{where}.raw_version: is required")
        raw_version = data["raw_version"]
        if not re.fullmatch(rf"{re.escape(semver)}-[0-9]+", raw_version):
            message = f"{raw_version!r} is not '{semver}-<timestamp>'"
            raise CatalogError(f"{where}.raw_version: {message}")
    return Release(
        commit=commit,
        semver=semver,
        revision=revision,
        is_final=is_final,
        raw_version=raw_version,
        status=ReleaseStatus(data.get("status", ReleaseStatus.SUCCESS.value)),
        images=_build_images(data, where, app_slug),
        invalidated=data.get("invalidated", False),
    )


_SINGLE_IMAGE_KEYS = ("hash", "platforms", "big_layer_mib", "big_layers")


def _build_images(data: Mapping[str, Any], where: str, app_slug: str) -> tuple[ReleaseImage, ...]:
    commit: str = data["commit"]
    if "services" not in data:
        if "big_layers" in data and not data.get("big_layer_mib"):
            raise CatalogError(f"{where}.big_layers: needs big_layer_mib, the size of each")
        return (
            ReleaseImage(
                service=DEFAULT_SERVICE_NAME,
                repository_hash=data.get("hash") or derive_repository_hash(app_slug, commit),
                platforms=tuple(Platform.parse(p) for p in data.get("platforms", [])),
                big_layer_mib=data.get("big_layer_mib", 0),
                big_layers=data.get("big_layers", 1),
            ),
        )
    misplaced = [key for key in _SINGLE_IMAGE_KEYS if key in data]
    if misplaced:
        message = f"{', '.join(misplaced)} belong to each service when a release lists services"
        raise CatalogError(f"{where}: {message}")
    services = data["services"]
    if _twice(s["name"] for s in services):
        raise CatalogError(f"{where}.services: lists a service twice")
    return tuple(
        ReleaseImage(
            service=s["name"],
            repository_hash=s.get("hash")
            or derive_repository_hash(app_slug, f"{commit}/{s['name']}"),
            platforms=tuple(Platform.parse(p) for p in s.get("platforms", [])),
        )
        for s in services
    )
