"""Evaluate a parsed OData query against the sandbox's rows, as the balena API's SQL would.

What the API compiles to SQL is done here on Python rows, keeping the SQL semantics a client
can observe: ``eq``/``ne`` are null-safe (``IS [NOT] DISTINCT FROM``) while everything else
follows three-valued logic; a property path through a navigation outside a lambda is a LEFT
JOIN, so a row appears once per joined row; ``any`` is ``EXISTS``, ``all`` is
``NOT EXISTS (... NOT body)``; ``NULL`` sorts last ascending and first descending, as in
PostgreSQL. Every navigation only reaches rows the caller may read.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import RESOURCES, Database, Resource, Row
from .odata import (
    Compare,
    Expression,
    Literal,
    Logical,
    Member,
    Not,
    QueryOptions,
    StartsWith,
)

__all__ = ["QueryError", "UnknownNameError", "UnsupportedQueryError", "run_query"]


class QueryError(Exception):
    """The query cannot be answered."""


class UnknownNameError(QueryError):
    """A name or a comparison the model cannot translate: the balena API answers 500."""


class UnsupportedQueryError(QueryError):
    """Valid for the balena API but outside what the stand-in models: answered with 400."""


Truth = bool | None
# A join's key: where its path starts (an alias, or "" for the row being filtered) and the
# navigations it follows.
JoinKey = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Place:
    """A row (``None`` for the NULL of an unmatched LEFT JOIN) and its resource."""

    row: Row | None
    resource: Resource


@dataclass(frozen=True)
class _Scope:
    """What names mean while evaluating an expression."""

    default: _Place
    aliases: Mapping[str, _Place]
    joins: Mapping[JoinKey, _Place]


class _Evaluator:
    def __init__(self, database: Database, visible: Mapping[str, frozenset[int]]) -> None:
        self._database = database
        self._visible = visible

    # ------------------------------------------------------------------ navigation

    def navigation_target(self, resource: Resource, name: str) -> Resource:
        """The resource ``name`` navigates to from ``resource``."""
        navigation = resource.navigations.get(name)
        if navigation is not None:
            return RESOURCES[navigation.target]
        if name in resource.unmodelled:
            raise UnsupportedQueryError(f"{resource.name}.{name} is not modelled by the sandbox")
        raise UnknownNameError(f"{resource.name} has no navigation {name!r}")

    def follow(self, place: _Place, name: str) -> list[Row]:
        """The readable rows navigation ``name`` leads to from ``place``."""
        target = self.navigation_target(place.resource, name)
        if place.row is None:
            return []
        navigation = place.resource.navigations[name]
        visible = self._visible[target.name]
        if navigation.reverse:
            found = [
                r for r in self._database.rows[target.name] if r[navigation.key] == place.row["id"]
            ]
        else:
            key = place.row[navigation.key]
            row = None if key is None else self._database.row(target.name, key)
            found = [] if row is None else [row]
        return [r for r in found if r["id"] in visible]

    # ------------------------------------------------------------------ joins

    def _origin(self, path: tuple[str, ...], scope: _Scope) -> tuple[str, tuple[str, ...]]:
        """Split ``path`` into where it starts (an alias or "") and the names after that."""
        if len(path) > 1 and path[0] in scope.aliases:
            return path[0], path[1:]
        return "", path

    def joins_of(self, expression: Expression | None, scope: _Scope) -> set[JoinKey]:
        """The LEFT JOINs ``expression`` needs, nested lambdas excluded (they join their own)."""
        found: set[JoinKey] = set()
        if isinstance(expression, Member):
            origin, names = self._origin(expression.path, scope)
            # A plain path's last name is a field; a lambda's is the collection it ranges over.
            for end in range(1, len(names)):
                found.add((origin, names[:end]))
        elif isinstance(expression, Compare | Logical):
            found |= self.joins_of(expression.left, scope) | self.joins_of(expression.right, scope)
        elif isinstance(expression, Not):
            found |= self.joins_of(expression.operand, scope)
        elif isinstance(expression, StartsWith):
            found |= self.joins_of(expression.text, scope) | self.joins_of(expression.prefix, scope)
        return found

    def combinations(self, base: _Scope, joins: set[JoinKey]) -> Iterator[_Scope]:
        """Every assignment of a joined row (or NULL) to each join: the joined rows of SQL."""
        ordered = sorted(joins, key=lambda key: len(key[1]))

        def extend(index: int, assigned: dict[JoinKey, _Place]) -> Iterator[dict[JoinKey, _Place]]:
            if index == len(ordered):
                yield assigned
                return
            origin, names = ordered[index]
            parent = (
                (base.aliases[origin] if origin else base.default)
                if len(names) == 1
                else assigned[(origin, names[:-1])]
            )
            target = self.navigation_target(parent.resource, names[-1])
            rows: Sequence[Row | None] = self.follow(parent, names[-1]) or [None]
            for row in rows:
                yield from extend(index + 1, {**assigned, ordered[index]: _Place(row, target)})

        for assigned in extend(0, dict(base.joins)):
            yield _Scope(base.default, base.aliases, assigned)

    # ------------------------------------------------------------------ values

    def place_of(self, path: tuple[str, ...], scope: _Scope) -> tuple[_Place, str]:
        """Where the last name of ``path`` is looked up, and that name."""
        origin, names = self._origin(path, scope)
        if len(names) == 1:
            return (scope.aliases[origin] if origin else scope.default), names[0]
        return scope.joins[(origin, names[:-1])], names[-1]

    def value(self, expression: Expression, scope: _Scope) -> Any:
        """The value of an operand (a literal, a field, or a boolean expression)."""
        if isinstance(expression, Literal):
            return expression.value
        if isinstance(expression, Member) and expression.lambda_ is None:
            place, name = self.place_of(expression.path, scope)
            return self.field_value(place, name)
        return self.truth(expression, scope)

    def field_value(self, place: _Place, name: str) -> Any:
        field = place.resource.field_name(name)
        if field is None:
            self.navigation_target(place.resource, name)  # unmodelled: 400, else:
            raise UnknownNameError(f"{name!r} of {place.resource.name} is not a field")
        return None if place.row is None else place.row[field]

    def truth(self, expression: Expression, scope: _Scope) -> Truth:
        """The SQL truth value of ``expression``: True, False or None (NULL)."""
        if isinstance(expression, Compare):
            equal = _same(self.value(expression.left, scope), self.value(expression.right, scope))
            return equal if expression.operator == "eq" else not equal
        if isinstance(expression, Logical):
            left, right = self.truth(expression.left, scope), self.truth(expression.right, scope)
            if expression.operator == "and":
                return (
                    False if False in (left, right) else (None if None in (left, right) else True)
                )
            return True if True in (left, right) else (None if None in (left, right) else False)
        if isinstance(expression, Not):
            operand = self.truth(expression.operand, scope)
            return None if operand is None else not operand
        if isinstance(expression, StartsWith):
            text, prefix = self.value(expression.text, scope), self.value(expression.prefix, scope)
            if text is None or prefix is None:
                return None
            if not isinstance(text, str) or not isinstance(prefix, str):
                raise UnknownNameError("startswith takes text")
            return text.startswith(prefix)
        if isinstance(expression, Member) and expression.lambda_ is not None:
            return self.lambda_truth(expression, scope)
        value = self.value(expression, scope)
        if value is not None and not isinstance(value, bool):
            raise UnknownNameError(f"{value!r} is not a boolean")
        return value

    def lambda_truth(self, member: Member, scope: _Scope) -> bool:
        lambda_ = member.lambda_
        assert lambda_ is not None
        start, name = self.place_of(member.path, scope)
        target = self.navigation_target(start.resource, name)
        outcomes: list[Truth] = []
        for row in self.follow(start, name):
            place = _Place(row, target)
            inner = _Scope(place, {**scope.aliases, lambda_.alias: place}, {})
            for combination in self.combinations(inner, self.joins_of(lambda_.body, inner)):
                outcomes.append(self.truth(lambda_.body, combination))
        if lambda_.method == "any":
            return True in outcomes
        return False not in outcomes

    # ------------------------------------------------------------------ collections

    def collect(
        self, rows: Sequence[Row], resource: Resource, options: QueryOptions
    ) -> list[dict[str, Any]]:
        """``rows`` filtered, ordered, paged and shaped as ``options`` say."""
        matched: list[tuple[Row, _Scope]] = []
        for row in rows:
            base = _Scope(_Place(row, resource), {}, {})
            joins = self.joins_of(options.filter, base)
            for order in options.orderby:
                joins |= self.joins_of(Member(order.path), base)
            for scope in self.combinations(base, joins):
                if options.filter is None or self.truth(options.filter, scope) is True:
                    matched.append((row, scope))
        for order in reversed(options.orderby):
            keyed = [(self.value(Member(order.path), scope), row, scope) for row, scope in matched]
            try:
                # PostgreSQL puts NULL after every value ascending, before them descending.
                keyed.sort(key=lambda item: (item[0] is None, item[0]), reverse=order.descending)
            except TypeError:
                raise UnknownNameError(f"cannot order by {'/'.join(order.path)}") from None
            matched = [(row, scope) for _, row, scope in keyed]
        start = options.skip or 0
        end = None if options.top is None else start + options.top
        return [self.shape(row, resource, options) for row, _ in matched[start:end]]

    def shape(self, row: Row, resource: Resource, options: QueryOptions) -> dict[str, Any]:
        """The JSON object of ``row``: selected fields, then expansions."""
        names = resource.fields if options.select is None else options.select
        document: dict[str, Any] = {}
        for name in names:
            field = resource.field_name(name)
            if field is None:
                self.navigation_target(resource, name)  # unmodelled: 400, else:
                raise UnknownNameError(f"{name!r} of {resource.name} cannot be selected")
            document[name] = _json(row[field], field in resource.links)
        for expand in options.expand:
            target = self.navigation_target(resource, expand.name)
            rows = self.follow(_Place(row, resource), expand.name)
            document[expand.name] = self.collect(rows, target, expand.options)
        return document


def _same(left: Any, right: Any) -> bool:
    """``IS NOT DISTINCT FROM``, refusing what PostgreSQL could not compare."""
    if left is None or right is None:
        return left is right
    kinds = {_kind(left), _kind(right)}
    if len(kinds) != 1 or "json" in kinds:
        raise UnknownNameError(f"cannot compare {left!r} with {right!r}")
    return bool(left == right)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, datetime.datetime):
        return "date"
    return "json"


def _json(value: Any, is_link: bool) -> Any:
    if is_link and value is not None:
        return {"__id": value}
    if isinstance(value, datetime.datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


def run_query(
    database: Database,
    resource_name: str,
    options: QueryOptions,
    visible: Mapping[str, frozenset[int]],
) -> list[dict[str, Any]]:
    """The ``d`` list of ``GET /v7/<resource_name>`` with ``options``, for what is ``visible``.

    Raises :class:`UnsupportedQueryError` or :class:`UnknownNameError`.
    """
    resource = RESOURCES[resource_name]
    rows = [r for r in database.rows[resource_name] if r["id"] in visible[resource_name]]
    return _Evaluator(database, visible).collect(rows, resource, options)
