"""The balena API query the resolver asks: an app, its pinned release, its successful releases.

Pure functions, no I/O. One query per app answers everything a pull needs (the tag's release,
the service's image, its repository and manifest digest), so a pull costs one API request per
name and caller, whatever it asks for next. Text from clients reaches the query only as an
OData string literal (``'`` doubled) and percent-encoded, so no slug can change the query's shape.
"""

from __future__ import annotations

from urllib.parse import quote

API_VERSION = "v7"
# Releases listed at most per app: an answer stays a few hundred KiB even for an app built
# on every commit for years; older releases than these are not resolved.
MAX_RELEASES = 1000
_RELEASE_FIELDS = "id,commit,semver,raw_version,revision,is_final,is_invalidated"
_IMAGE_FIELDS = "is_stored_at__image_location,content_hash"
# What percent-encoding leaves as it is: OData's own punctuation and unreserved characters.
# Everything else a literal holds ('&', '#', '%', '+', spaces, ...) is escaped.
_SAFE = "$=(),;/'*:-._~"


def literal(text: str) -> str:
    """``text`` as an OData string literal, ready for a URL: quoted, ``'`` doubled, encoded."""
    return quote("'" + text.replace("'", "''") + "'", safe=_SAFE)


def app_query(slug: str) -> str:
    """The path and query of the one request that describes the app ``slug`` for a pull.

    Only successful releases, newest first; each with its images' location, manifest digest
    and service name; and the app's target release, which the keywords mean.
    """
    service = "is_a_build_of__service($select=service_name)"
    image = f"image($select={_IMAGE_FIELDS};$expand={service})"
    release_image = f"release_image($select=id;$expand={image})"
    releases = (
        f"owns__release($select={_RELEASE_FIELDS};$filter=status eq 'success';"
        f"$orderby=created_at desc;$top={MAX_RELEASES};$expand={release_image})"
    )
    options = [
        "$select=id,slug",
        f"$filter=slug eq {literal(slug)}",
        f"$expand=should_be_running__release($select=id),{releases}",
    ]
    return f"/{API_VERSION}/application?" + "&".join(o.replace(" ", "%20") for o in options)
