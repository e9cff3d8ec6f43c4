"""Parse a request target under ``/v2/`` into a registry API route.

Pure functions, no I/O. The parser is deliberately strict: anything that is not the canonical
spelling of a registry API path (percent-escapes, ``.``/``..`` segments, empty segments, names
outside the OCI grammar) is refused here, so that nothing ambiguous ever reaches the upstream
registry. Distribution's own router, for one, answers ``..`` paths with a redirect that a proxy
would otherwise pass on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from .errors import RegistryError, bad_request, not_an_endpoint, unsupported_method

MAX_NAME_LENGTH = 255
MAX_TARGET_LENGTH = 4096

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_UPLOAD_RE = re.compile(r"/blobs/uploads(?:/[^/]*)?$")
_ABSOLUTE_FORM_RE = re.compile(r"https?://[^/?#]*(?=[/?]|$)", re.IGNORECASE)
# What a canonical path or query may contain: printable ASCII without space, '%', '\' or '#'.
_SAFE_PATH_RE = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=/-]*")
_SAFE_QUERY_RE = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=/?%-]*")


class Kind(Enum):
    """Which registry API endpoint a request targets."""

    BASE = "base"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed ``/v2/`` request target.

    ``repository`` is None for the base and catalog endpoints; ``reference`` is the tag or digest
    of manifests, the digest of blobs and referrers (None for the others).
    """

    kind: Kind
    repository: str | None = None
    reference: str | None = None
    query: str = ""

    @property
    def by_digest(self) -> bool:
        """Whether the reference is a content digest rather than a tag."""
        return self.reference is not None and DIGEST_RE.fullmatch(self.reference) is not None

    def path(self, repository: str | None = None, reference: str | None = None) -> str:
        """The path of this route, optionally with another repository and/or reference."""
        name = repository if repository is not None else self.repository
        ref = reference if reference is not None else self.reference
        if self.kind is Kind.BASE:
            return "/v2/"
        if self.kind is Kind.CATALOG:
            return "/v2/_catalog"
        if self.kind is Kind.TAGS:
            return f"/v2/{name}/tags/list"
        endpoint = {Kind.MANIFEST: "manifests", Kind.BLOB: "blobs", Kind.REFERRERS: "referrers"}
        return f"/v2/{name}/{endpoint[self.kind]}/{ref}"

    def target(self, repository: str | None = None, reference: str | None = None) -> str:
        """Path plus query string, ready to send upstream."""
        path = self.path(repository, reference)
        return f"{path}?{self.query}" if self.query else path


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a repository name the OCI distribution grammar allows."""
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def is_digest(reference: str) -> bool:
    """Whether ``reference`` is a content digest (``<algorithm>:<encoded>``), not a tag."""
    return DIGEST_RE.fullmatch(reference) is not None


# Clients repeat the same few targets (a pull asks for each blob and manifest more than once):
# parsing each once is worth a small bounded memory.
@lru_cache(maxsize=256)
def parse_target(target: str) -> Route:
    """Parse a raw request target (path and query, as sent) that starts with ``/v2``.

    Raises ``RegistryError`` (400 for malformed input, 404 for paths that are no registry
    endpoint) instead of returning anything that could not be forwarded as it is.
    """
    if len(target) > MAX_TARGET_LENGTH:
        raise RegistryError(414, "NAME_INVALID", "request target too long")
    # HTTP/1.1 lets a client send the absolute form (what it would send to a forward proxy).
    absolute = _ABSOLUTE_FORM_RE.match(target)
    if absolute is not None:
        target = target[absolute.end() :] or "/"
    path, _, query = target.partition("?")
    if not _SAFE_QUERY_RE.fullmatch(query):
        raise bad_request("UNSUPPORTED", "query string contains characters that are not allowed")
    if "%" in path or not _SAFE_PATH_RE.fullmatch(path):
        raise bad_request(
            "NAME_INVALID", "request path is not canonical (escaped or unexpected characters)"
        )
    if path in ("/v2", "/v2/"):
        return Route(Kind.BASE, query=query)
    if not path.startswith("/v2/"):
        raise not_an_endpoint("not a registry API path")
    if _UPLOAD_RE.search(path):
        raise unsupported_method("uploading")
    segments = path[len("/v2/") :].split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise bad_request("NAME_INVALID", "request path has empty, '.' or '..' segments")
    if segments == ["_catalog"]:
        return Route(Kind.CATALOG, query=query)
    kind, name_parts, reference = _split_endpoint(segments)
    repository = "/".join(name_parts)
    if not is_valid_name(repository):
        raise bad_request(
            "NAME_INVALID", _name_problem(repository), {"name": repository[:MAX_NAME_LENGTH]}
        )
    _check_reference(kind, reference)
    return Route(kind, repository, reference, query)


_REVISION_RE = re.compile(r"(\d+\.\d+\.\d+)\+rev\d+")


def _name_problem(repository: str) -> str:
    """What is wrong with an invalid repository name, as a person would fix it."""
    if len(repository) > MAX_NAME_LENGTH:
        return f"invalid repository name: longer than {MAX_NAME_LENGTH} characters"
    for part in repository.split("/"):
        if revision := _REVISION_RE.fullmatch(part):
            return (
                f"invalid repository name: '+rev' cannot be written in an image name; "
                f"{revision[1]} pulls its newest revision, a release's commit pulls that one"
            )
    if repository != repository.lower():
        return "invalid repository name: image names are lower case"
    return "invalid repository name"


def _split_endpoint(segments: list[str]) -> tuple[Kind, list[str], str | None]:
    """Split path segments into endpoint kind, repository name parts and reference."""
    if len(segments) >= 3 and segments[-2:] == ["tags", "list"]:
        return Kind.TAGS, segments[:-2], None
    if len(segments) >= 3:
        endpoint = {"manifests": Kind.MANIFEST, "blobs": Kind.BLOB, "referrers": Kind.REFERRERS}
        kind = endpoint.get(segments[-2])
        if kind is not None:
            return kind, segments[:-2], segments[-1]
    raise not_an_endpoint("not a registry API endpoint")


def _check_reference(kind: Kind, reference: str | None) -> None:
    """Refuse references outside the grammar of their endpoint."""
    if reference is None:
        return
    if kind is Kind.MANIFEST:
        if TAG_RE.fullmatch(reference) or DIGEST_RE.fullmatch(reference):
            return
        raise bad_request("MANIFEST_INVALID", "invalid tag or digest", {"reference": reference})
    if not DIGEST_RE.fullmatch(reference):
        raise bad_request("DIGEST_INVALID", "invalid digest", {"digest": reference})
