"""Parse the query string of a ``/v7`` request into a small OData syntax tree.

The grammar (``odata.lark``, read by lark's LALR parser) covers the subset of OData the
sandbox's balena API stand-in evaluates, written as the balena API's own parser reads it. The
tree is plain frozen dataclasses; evaluating it against the sandbox's data is ``query.py``'s
job.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from typing import Literal as TypingLiteral

import lark

__all__ = [
    "Compare",
    "Expand",
    "Expression",
    "Lambda",
    "Literal",
    "Logical",
    "Member",
    "Not",
    "ODataEncodingError",
    "ODataSyntaxError",
    "OrderBy",
    "Query",
    "QueryOptions",
    "StartsWith",
    "parse_query",
    "quote_literal",
]


class ODataSyntaxError(ValueError):
    """The query string is outside the grammar: the balena API's "Malformed url" (400)."""


class ODataEncodingError(ValueError):
    """A percent-escape does not decode, which the balena API answers with a 500."""


Value = str | int | float | bool | None


@dataclass(frozen=True)
class Literal:
    """A constant: quoted text, a number, ``true``/``false`` or ``null``."""

    value: Value


@dataclass(frozen=True)
class Lambda:
    """``any(alias:body)`` or ``all(alias:body)`` over the collection a member path names."""

    method: TypingLiteral["any", "all"]
    alias: str
    body: Expression


@dataclass(frozen=True)
class Member:
    """A property path such as ``a/slug``, optionally ending in a lambda."""

    path: tuple[str, ...]
    lambda_: Lambda | None = None


@dataclass(frozen=True)
class Compare:
    """``left eq right`` or ``left ne right``."""

    operator: TypingLiteral["eq", "ne"]
    left: Expression
    right: Expression


@dataclass(frozen=True)
class Logical:
    """``and``/``or`` of two operands."""

    operator: TypingLiteral["and", "or"]
    left: Expression
    right: Expression


@dataclass(frozen=True)
class Not:
    """``not operand``."""

    operand: Expression


@dataclass(frozen=True)
class StartsWith:
    """``startswith(text, prefix)``."""

    text: Expression
    prefix: Expression


Expression = Literal | Member | Compare | Logical | Not | StartsWith


@dataclass(frozen=True)
class OrderBy:
    """One ``$orderby`` key: a property path and its direction."""

    path: tuple[str, ...]
    descending: bool


@dataclass(frozen=True)
class Expand:
    """One ``$expand`` navigation with the options that apply to what it expands."""

    name: str
    options: QueryOptions


@dataclass(frozen=True)
class QueryOptions:
    """The ``$`` options of a request or of one expansion.

    ``select`` is ``None`` when every field is wanted (no ``$select``, or ``$select=*``).
    """

    select: tuple[str, ...] | None = None
    filter: Expression | None = None
    expand: tuple[Expand, ...] = ()
    orderby: tuple[OrderBy, ...] = ()
    top: int | None = None
    skip: int | None = None


@dataclass(frozen=True)
class Query:
    """A whole query string: its options and its other parameters (``apikey=...``)."""

    options: QueryOptions = field(default_factory=QueryOptions)
    parameters: Mapping[str, str] = field(default_factory=dict)


def quote_literal(text: str) -> str:
    """``text`` as an OData string literal ready to go into a raw query string.

    Apostrophes are doubled, as OData quotes them; ``%``, spaces, ``&``, ``+``, non-ASCII and
    the other reserved characters are percent-encoded, so no value can end the literal or
    the option early.
    """
    return "'" + urllib.parse.quote(text.replace("'", "''"), safe="'") + "'"


@cache
def _parser() -> lark.Lark:
    grammar = Path(__file__).with_name("odata.lark").read_text("utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual", maybe_placeholders=False)


def parse_query(raw_query: str) -> Query:
    """Parse ``raw_query``, the query string exactly as it arrived (percent-escapes intact).

    Raises :class:`ODataSyntaxError` for anything outside the grammar, naming where, and
    :class:`ODataEncodingError` for a percent-escape that is not UTF-8.
    """
    try:
        tree = _parser().parse(raw_query)
    except lark.exceptions.UnexpectedInput as exc:
        raise ODataSyntaxError(
            f"not in the sandbox's OData subset at column {exc.column}"
        ) from None
    try:
        return _ToQuery().transform(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, ODataEncodingError | ODataSyntaxError):
            raise exc.orig_exc from None
        raise


_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_APOSTROPHE_RE = re.compile(r"'|%27")
_KEYWORD_RE = re.compile(r"[a-z]+")


def _decode(text: str) -> str:
    """JavaScript's decodeURIComponent, which the balena API applies to names and text."""
    text = str(text)  # a lark Token is a str subclass; keep plain strings in the tree
    # The messages leave the text out: it may be a parameter holding a credential.
    if _ESCAPE_RE.search(text):
        raise ODataEncodingError("a '%' starts no percent-escape")
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ODataEncodingError("a percent-escape encodes bytes that are not UTF-8") from None


def _keyword(token: lark.Token) -> str:
    """The operator or direction word of a token that also carries the blanks around it."""
    found = _KEYWORD_RE.search(str(token))
    assert found is not None  # every such terminal's pattern contains the word
    return found[0]


def _unquote(token: lark.Token) -> str:
    # Drop the delimiters; a doubled apostrophe (written either way) stands for one.
    inner = _APOSTROPHE_RE.sub("'", str(token))[1:-1]
    return _decode(inner.replace("''", "'"))


def _number(token: lark.Token) -> int | float:
    text = str(token).replace("%2B", "+")
    return float(text) if "." in text else int(text)


def _options(items: list[tuple[str, Any]]) -> QueryOptions:
    # A repeated option replaces the earlier one, as in the balena API (Object.fromEntries).
    found = dict(items)
    return QueryOptions(
        select=found.get("select"),
        filter=found.get("filter"),
        expand=found.get("expand", ()),
        orderby=found.get("orderby", ()),
        top=found.get("top"),
        skip=found.get("skip"),
    )


class _ToQuery(lark.Transformer[lark.Token, Query]):
    """Turns the parse tree into the dataclasses above, bottom-up.

    Each option becomes a ``(name, value)`` pair that :func:`_options` collects.
    """

    def start(self, items: list[tuple[str, Any]]) -> Query:
        parameters = dict(value for kind, value in items if kind == "param")
        options = [(kind, value) for kind, value in items if kind != "param"]
        return Query(options=_options(options), parameters=parameters)

    def param(self, items: list[tuple[str, str]]) -> tuple[str, tuple[str, str]]:
        parts = dict(items)
        return "param", (parts.get("name", ""), parts.get("value", ""))

    def param_name(self, items: list[lark.Token]) -> tuple[str, str]:
        return "name", _decode(items[0])

    def param_value(self, items: list[lark.Token]) -> tuple[str, str]:
        return "value", _decode(items[0])

    def select(self, items: list[tuple[str, ...] | None]) -> tuple[str, tuple[str, ...] | None]:
        return "select", items[0]

    def select_list(self, items: list[lark.Token]) -> tuple[str, ...] | None:
        return None if items[0].type == "STAR" else tuple(str(item) for item in items)

    def filter(self, items: list[Expression]) -> tuple[str, Expression]:
        return "filter", items[0]

    def expand(self, items: list[tuple[Expand, ...]]) -> tuple[str, tuple[Expand, ...]]:
        return "expand", items[0]

    def expand_list(self, items: list[Expand]) -> tuple[Expand, ...]:
        return tuple(items)

    def expand_item(self, items: list[Any]) -> Expand:
        name, *options = items
        return Expand(name=str(name), options=_options(options))

    def orderby(self, items: list[tuple[OrderBy, ...]]) -> tuple[str, tuple[OrderBy, ...]]:
        return "orderby", items[0]

    def order_list(self, items: list[OrderBy]) -> tuple[OrderBy, ...]:
        return tuple(items)

    def order_item(self, items: list[Any]) -> OrderBy:
        # An omitted direction sorts descending in the balena API (odata-parser's SortProperty).
        descending = len(items) == 1 or _keyword(items[1]) == "desc"
        return OrderBy(path=items[0], descending=descending)

    def path(self, items: list[lark.Token]) -> tuple[str, ...]:
        return tuple(str(item) for item in items)

    def top(self, items: list[lark.Token]) -> tuple[str, int]:
        return "top", int(items[0])

    def skip(self, items: list[lark.Token]) -> tuple[str, int]:
        return "skip", int(items[0])

    def expression(self, items: list[Any]) -> Expression:
        # odata-parser groups and/or from the left, whatever their mix.
        result: Expression = items[0]
        for operator, operand in zip(items[1::2], items[2::2], strict=True):
            result = Logical(_keyword(operator), result, operand)  # type: ignore[arg-type]
        return result

    def comparison(self, items: list[Any]) -> Compare:
        left, operator, right = items
        return Compare(_keyword(operator), left, right)  # type: ignore[arg-type]

    def negation(self, items: list[Any]) -> Not:
        return Not(items[1])

    def startswith(self, items: list[Any]) -> StartsWith:
        return StartsWith(items[1], items[2])

    def member(self, items: list[Any]) -> Member:
        tokens = [item for item in items if isinstance(item, lark.Token)]
        if not any(token.type == "LAMBDA" for token in tokens):
            return Member(path=tuple(str(token) for token in tokens))
        *path, method, alias = (str(token) for token in tokens)
        method_name: TypingLiteral["any", "all"] = "any" if method.startswith("any") else "all"
        return Member(path=tuple(path), lambda_=Lambda(method_name, alias, items[-1]))

    def text(self, items: list[lark.Token]) -> Literal:
        return Literal(_unquote(items[0]))

    def number(self, items: list[lark.Token]) -> Literal:
        return Literal(_number(items[0]))

    def true(self, _: list[lark.Token]) -> Literal:
        return Literal(True)

    def false(self, _: list[lark.Token]) -> Literal:
        return Literal(False)

    def null(self, _: list[lark.Token]) -> Literal:
        return Literal(None)
