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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_SELECTORS",
    "AccessEntry",
    "App",
    "Catalog",
    "CatalogError",
    "Organization",
    "Platform",
    "Release",
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

_APP_NAME_RE = re.compile(r"^([a-z0-9_-]+)/([a-z0-9_-]+)(?:/([a-z0-9_.-]+))?(?:/([a-z0-9_-]+))?$")
_DIRECT_NAME_RE = re.compile(r"^v2/([0-9a-f]{32})$")
_HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
_SEMVER_RE = re.compile(r"^(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)$")
_HANDLE_RE = re.compile(r"^[a-z0-9_-]+$")
_PLATFORM_RE = re.compile(r"^([a-z0-9]+)/([a-z0-9_]+)(?:/([a-z0-9]+))?$")
_PULL = "pull"


class CatalogError(ValueError):
    """The catalog file is unreadable or describes an inconsistent world."""


class ReleaseStatus(enum.StrEnum):
    """Build status of a release; only successful releases are ever resolved by name."""

    SUCCESS = "success"
    FAILED = "failed"
    RUNNING = "running"


@dataclass(frozen=True)
class Platform:
    """An OCI platform such as ``linux/arm64`` or ``linux/arm/v7``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/architecture[/variant]``; raise :class:`ValueError` if malformed."""
        match = _PLATFORM_RE.match(text)
        if match is None:
            raise ValueError(f"invalid platform {text!r}, expected os/arch[/variant]")
        return cls(os=match[1], architecture=match[2], variant=match[3])

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return base if self.variant is None else f"{base}/{self.variant}"


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
class Release:
    """One release of an app; its image lives in the registry at :attr:`repository`."""

    commit: str
    semver: str
    revision: int
    is_final: bool
    raw_version: str
    status: ReleaseStatus
    repository_hash: str
    platforms: tuple[Platform, ...] = ()
    big_layer_mib: int = 0

    @property
    def repository(self) -> str:
        """The opaque registry repository name, ``v2/<hash>``."""
        return f"v2/{self.repository_hash}"

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

    def release_by_hash(self, repository_hash: str) -> tuple[App, Release] | None:
        """Return the release stored at ``v2/<repository_hash>`` and its app."""
        for app in self.apps:
            for release in app.releases:
                if release.repository_hash == repository_hash:
                    return app, release
        return None

    def all_releases(self) -> list[tuple[App, Release]]:
        """Every release of every app, whatever its status."""
        return [(app, release) for app in self.apps for release in app.releases]


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


def resolve_release(app: App, selector: str | None) -> Release | None:
    """Pick the successful release of ``app`` that ``selector`` designates, if any."""
    candidates = [r for r in app.releases if r.status is ReleaseStatus.SUCCESS]
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
        found = catalog.release_by_hash(direct[1])
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
    if release is not None:
        return AccessEntry(name=release.repository, actions=pull, alias=request.name)
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


class _Fields:
    """Typed access to one mapping of the catalog, naming its location in every error."""

    def __init__(self, data: object, where: str, allowed: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise CatalogError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise CatalogError(f"{where}: unknown key(s) {', '.join(unknown)}")
        self._data = data
        self.where = where

    def error(self, key: str, message: str) -> CatalogError:
        return CatalogError(f"{self.where}.{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def string(self, key: str, pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
        if key not in self._data:
            raise self.error(key, "is required")
        value = self._data[key]
        if not isinstance(value, str):
            # YAML turns unquoted 1.2 or all-digit hex into numbers; say how to fix it.
            raise self.error(key, f"must be a string (quote it in YAML), got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"{value!r} is not {hint}")
        return value

    def optional_string(self, key: str, pattern: re.Pattern[str], hint: str) -> str | None:
        return self.string(key, pattern, hint) if key in self._data else None

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self._data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(key, f"must be a non-negative integer, got {value!r}")
        return value

    def items(self, key: str, required: bool = True) -> list[object]:
        if key not in self._data:
            if required:
                raise self.error(key, "is required")
            return []
        value = self._data[key]
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {type(value).__name__}")
        return value


def _string_list(fields: _Fields, key: str, pattern: re.Pattern[str], hint: str) -> list[str]:
    values = fields.items(key, required=False)
    for i, value in enumerate(values):
        if not isinstance(value, str) or not pattern.match(value):
            raise CatalogError(f"{fields.where}.{key}[{i}]: {value!r} is not {hint}")
    return [str(v) for v in values]


def _parse_release(data: object, where: str, app_slug: str) -> Release:
    fields = _Fields(
        data,
        where,
        (
            "commit",
            "semver",
            "revision",
            "final",
            "raw_version",
            "status",
            "hash",
            "platforms",
            "big_layer_mib",
        ),
    )
    commit = fields.string("commit", _HEX32_RE, "a 32-character lowercase hex commit")
    semver = fields.string("semver", _SEMVER_RE, "a semver like 1.2.3")
    is_final = fields.boolean("final", default=True)
    revision = fields.integer("revision", default=0)
    if is_final:
        if fields.has("raw_version"):
            raise fields.error("raw_version", "only drafts (final: false) have a raw_version")
        raw_version = semver if revision == 0 else f"{semver}+rev{revision}"
    else:
        if revision != 0:
            raise fields.error("revision", "drafts (final: false) have no revision")
        draft_re = re.compile(rf"^{re.escape(semver)}-[0-9]+$")
        raw_version = fields.string("raw_version", draft_re, f"'{semver}-<timestamp>'")
    status_text = fields.string("status") if fields.has("status") else ReleaseStatus.SUCCESS.value
    try:
        status = ReleaseStatus(status_text)
    except ValueError:
        allowed = ", ".join(s.value for s in ReleaseStatus)
        raise fields.error("status", f"{status_text!r} is not one of {allowed}") from None
    repository_hash = fields.optional_string("hash", _HEX32_RE, "32 lowercase hex characters")
    platforms: list[Platform] = []
    for i, text in enumerate(fields.items("platforms", required=False)):
        try:
            if not isinstance(text, str):
                raise ValueError(f"invalid platform {text!r}, expected os/arch[/variant]")
            platforms.append(Platform.parse(text))
        except ValueError as exc:
            raise CatalogError(f"{where}.platforms[{i}]: {exc}") from None
    if len({str(p) for p in platforms}) != len(platforms):
        raise fields.error("platforms", "lists a platform twice")
    return Release(
        commit=commit,
        semver=semver,
        revision=revision,
        is_final=is_final,
        raw_version=raw_version,
        status=status,
        repository_hash=repository_hash or derive_repository_hash(app_slug, commit),
        platforms=tuple(platforms),
        big_layer_mib=fields.integer("big_layer_mib", default=0),
    )


def _parse_app(data: object, where: str, orgs: set[str]) -> App:
    fields = _Fields(data, where, ("slug", "public", "pinned_release", "releases"))
    slug = fields.string("slug", re.compile(r"^[a-z0-9_-]+/[a-z0-9_-]+$"), "an 'org/app' slug")
    org, name = slug.split("/")
    if org not in orgs:
        raise fields.error("slug", f"organization {org!r} is not declared in orgs")
    releases = tuple(
        _parse_release(item, f"{where}.releases[{i}]", slug)
        for i, item in enumerate(fields.items("releases", required=False))
    )
    finals = [(r.semver, r.revision) for r in releases if r.is_final]
    if len(set(finals)) != len(finals):
        raise fields.error("releases", "two final releases share a semver and revision")
    drafts = [r.raw_version for r in releases if not r.is_final]
    if len(set(drafts)) != len(drafts):
        raise fields.error("releases", "two drafts share a raw_version")
    pinned = fields.optional_string("pinned_release", _HEX32_RE, "a 32-character commit")
    if pinned is not None:
        target = next((r for r in releases if r.commit == pinned), None)
        if target is None:
            raise fields.error("pinned_release", f"{pinned} is not a release of {slug}")
        if target.status is not ReleaseStatus.SUCCESS:
            raise fields.error("pinned_release", f"{pinned} did not succeed ({target.status})")
    return App(
        org=org,
        name=name,
        public=fields.boolean("public", default=False),
        pinned_commit=pinned,
        releases=releases,
    )


def catalog_from_data(data: object) -> Catalog:
    """Validate already-parsed YAML/JSON data and build the :class:`Catalog`."""
    fields = _Fields(data, "catalog", ("orgs", "users", "apps"))
    handles = _string_list(fields, "orgs", _HANDLE_RE, "a lowercase org handle")
    if len(set(handles)) != len(handles):
        raise fields.error("orgs", "lists an organization twice")
    users: list[User] = []
    for i, item in enumerate(fields.items("users", required=False)):
        user_fields = _Fields(item, f"catalog.users[{i}]", ("username", "api_key", "orgs"))
        username = user_fields.string("username", _HANDLE_RE, "a lowercase username")
        api_key = user_fields.string("api_key", re.compile(r"^\S{8,}$"), "8+ non-blank characters")
        member_of = _string_list(user_fields, "orgs", _HANDLE_RE, "a lowercase org handle")
        for org in member_of:
            if org not in handles:
                raise user_fields.error("orgs", f"organization {org!r} is not declared in orgs")
        users.append(User(username=username, api_key=api_key, orgs=frozenset(member_of)))
    if len({u.username for u in users}) != len(users):
        raise fields.error("users", "two users share a username")
    if len({u.api_key for u in users}) != len(users):
        raise fields.error("users", "two users share an api_key")
    apps = [
        _parse_app(item, f"catalog.apps[{i}]", set(handles))
        for i, item in enumerate(fields.items("apps", required=False))
    ]
    if len({a.slug for a in apps}) != len(apps):
        raise fields.error("apps", "two apps share a slug")
    releases = [r for a in apps for r in a.releases]
    if len({r.commit for r in releases}) != len(releases):
        raise fields.error("apps", "two releases share a commit")
    if len({r.repository_hash for r in releases}) != len(releases):
        raise fields.error("apps", "two releases share a repository hash")
    return Catalog(
        orgs=tuple(Organization(h) for h in handles),
        users=tuple(users),
        apps=tuple(apps),
    )
