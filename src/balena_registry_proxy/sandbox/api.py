"""The read side of the balena API stand-in: ``GET /v7/<resource>?<OData>``.

Answers as open-balena-api (pinejs) does: ``{"d": [...]}``; a query outside the grammar is a
400 whose body is the JSON string ``"Malformed url: '<url as sent>'"``; a name the model cannot
translate (an unknown field, a reverse navigation in ``$select``) is a 500 with an empty body;
an unknown resource is a 401 with an empty body. Read permissions are filters, so what a
caller may not read is simply absent: a private app read anonymously gives ``{"d": []}``.

Credentials as in open-balena-api's ``src/infra/auth/api-keys.ts``: ``?apikey=<key>`` or
``Authorization: Bearer <key>``. A Bearer value that is no known key is ignored (the request
is a guest's); an unknown ``?apikey=`` makes pinejs' own API key hook throw, a 500.
"""

from __future__ import annotations

import json
import logging
import re

from aiohttp import hdrs, web

from .catalog import Catalog, User
from .model import RESOURCE_NAMES, Database
from .odata import ODataEncodingError, ODataSyntaxError, parse_query
from .query import UnknownNameError, UnsupportedQueryError, run_query

__all__ = ["API_PREFIX", "add_api_routes"]

API_PREFIX = "/v7"
_LOG = logging.getLogger(__name__)
_DATABASE = web.AppKey("v7_database", Database)
_CATALOG = web.AppKey("v7_catalog", Catalog)
# odata-parser's ResourceName: anything else in the path (a key, /$count, ...) is outside
# the subset.
_RESOURCE_RE = re.compile(r"[^:/?#\[\]@!$*&()+,;= %]+")


class _CredentialsError(Exception):
    """An ``apikey`` parameter that names no key."""


def _caller(request: web.Request, catalog: Catalog) -> User | None:
    """The user whose key the request carries, ``None`` for a guest."""
    api_key = request.query.get("apikey")
    if api_key is not None:
        user = catalog.user_by_api_key(api_key)
        if user is None:
            raise _CredentialsError
        return user
    parts = request.headers.get(hdrs.AUTHORIZATION, "").split(" ")
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return catalog.user_by_api_key(parts[1])
    return None


def _malformed(request: web.Request, reason: str) -> web.Response:
    # The reason goes to the log only: the body is the API's, which names the URL, not why.
    _LOG.warning("/v7 answered 400: %s", reason)
    body = json.dumps(f"Malformed url: '{request.raw_path}'")
    return web.Response(status=400, text=body, content_type="application/json")


def _untranslatable(reason: str) -> web.Response:
    _LOG.warning("/v7 answered 500: %s", reason)
    return web.Response(status=500)


async def _read(request: web.Request) -> web.Response:
    catalog = request.app[_CATALOG]
    try:
        user = _caller(request, catalog)
    except _CredentialsError:
        return _untranslatable("the apikey parameter is no key")
    try:
        query = parse_query(request.rel_url.raw_query_string)
    except ODataSyntaxError as exc:
        return _malformed(request, str(exc))
    except ODataEncodingError as exc:
        return _untranslatable(str(exc))
    requested = request.match_info["resource"]
    resource = RESOURCE_NAMES.get(requested)
    if resource is None:
        if _RESOURCE_RE.fullmatch(requested):
            return web.Response(status=401)
        return _malformed(request, f"{requested!r} is not a plain resource name")
    database = request.app[_DATABASE]
    try:
        rows = run_query(database, resource, query.options, database.visible(user))
    except UnsupportedQueryError as exc:
        return _malformed(request, str(exc))
    except UnknownNameError as exc:
        return _untranslatable(str(exc))
    return web.json_response({"d": rows}, headers={hdrs.CACHE_CONTROL: "no-cache"})


def add_api_routes(app: web.Application, catalog: Catalog, database: Database) -> None:
    """Serve ``GET /v7/<resource>`` on ``app`` from ``database`` (built from ``catalog``)."""
    app[_CATALOG] = catalog
    app[_DATABASE] = database
    app.router.add_get(API_PREFIX + "/{resource}", _read)
