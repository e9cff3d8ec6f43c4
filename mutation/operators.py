"""Two mutation operators that Cosmic Ray's core set lacks: text changed, statements removed.

Cosmic Ray flips comparisons, negates conditions and changes numbers and keywords, but leaves
string constants and whole statements alone, so an error message nobody checks, or a
``headers.pop("authorization")`` nobody misses, would never show up. These two add them, in
Cosmic Ray's own operator interface over parso's tree. Runs in the mutation tools' venv only.
"""

from __future__ import annotations

from collections.abc import Iterator

import parso.python.tree
import parso.tree
from cosmic_ray.operators.operator import Example, Operator

Position = tuple[tuple[int, int], tuple[int, int]]

# Statements that do something on their own: removing one is a real change, not a guaranteed
# NameError. Plain assignments count too: `value = value.strip()` removed is a real mutant.
_REMOVABLE = frozenset({"expr_stmt", "raise_stmt", "del_stmt"})
_QUOTES = ('"""', "'''", '"', "'")


def in_function(node: parso.tree.NodeOrLeaf) -> bool:
    """Whether ``node`` runs when a function is called, not when its module is imported."""
    parent = node.parent
    while parent is not None:
        if parent.type in ("funcdef", "lambdef"):
            return True
        parent = parent.parent
    return False


def in_annotation(node: parso.tree.NodeOrLeaf) -> bool:
    """Whether ``node`` is part of a type annotation (never evaluated: the modules all use
    ``from __future__ import annotations``)."""
    child, parent = node, node.parent
    while parent is not None:
        siblings = parent.children
        index = siblings.index(child)
        if parent.type == "tfpdef" and index == 2:
            return True
        if parent.type == "annassign" and index == 1:
            return True
        if parent.type == "funcdef" and index > 0 and _is(siblings[index - 1], "->"):
            return True
        child, parent = parent, parent.parent
    return False


def _is(node: parso.tree.NodeOrLeaf, operator: str) -> bool:
    return isinstance(node, parso.python.tree.Operator) and node.value == operator


def _is_docstring(leaf: parso.tree.NodeOrLeaf) -> bool:
    """A string that is a statement of its own: a docstring, or a no-op."""
    parent = leaf.parent
    if parent is not None and parent.type == "strings":
        parent = parent.parent
    return parent is not None and parent.type == "simple_stmt"


def _is_call(node: parso.tree.NodeOrLeaf) -> bool:
    """An expression statement that calls something: ``lines.append(x)``, ``check(y)``."""
    if node.type not in ("atom_expr", "power") or not isinstance(node, parso.tree.BaseNode):
        return False
    last = node.children[-1]
    return last.type == "trailer" and _is(last.children[0], "(")


class ReplaceString(Operator):  # type: ignore[misc]  # Cosmic Ray is untyped
    """A string constant (or an f-string's text) gets ``XX`` at both ends."""

    def mutation_positions(self, node: parso.tree.NodeOrLeaf) -> Iterator[Position]:
        if node.type not in ("string", "fstring_string"):
            return
        if node.type == "string" and _is_docstring(node):
            return
        if in_annotation(node):
            return
        yield (node.start_pos, node.end_pos)

    def mutate(self, node: parso.tree.Leaf, index: int) -> parso.tree.Leaf:
        assert index == 0
        if node.type == "fstring_string":
            node.value = f"XX{node.value}XX"
            return node
        value: str = node.value
        prefix_end = next(i for i, char in enumerate(value) if char in "'\"")
        quote = next(q for q in _QUOTES if value.startswith(q, prefix_end))
        start, end = prefix_end + len(quote), len(value) - len(quote)
        node.value = f"{value[:start]}XX{value[start:end]}XX{value[end:]}"
        return node

    @classmethod
    def examples(cls) -> tuple[Example, ...]:
        return (
            Example("x = 'abc'", "x = 'XXabcXX'"),
            Example('x = rb"a"', 'x = rb"XXaXX"'),
            Example('x = f"a{b}c"', 'x = f"a{b}XXcXX"', occurrence=1),
            Example(
                'def f():\n    """Doc."""\n    return ""\n',
                'def f():\n    """Doc."""\n    return "XXXX"\n',
            ),
        )


class RemoveStatement(Operator):  # type: ignore[misc]  # Cosmic Ray is untyped
    """A statement in a function body (an assignment, a call, ``raise``, ``del``) becomes
    ``pass``."""

    def mutation_positions(self, node: parso.tree.NodeOrLeaf) -> Iterator[Position]:
        parent = node.parent
        if parent is None or parent.type != "simple_stmt":
            return
        if node.type not in _REMOVABLE and not _is_call(node):
            return
        if not in_function(node):
            return
        yield (node.start_pos, node.end_pos)

    def mutate(self, node: parso.tree.NodeOrLeaf, index: int) -> parso.tree.Leaf:
        assert index == 0
        prefix = node.get_first_leaf().prefix
        return parso.python.tree.Keyword("pass", node.start_pos, prefix=prefix)

    @classmethod
    def examples(cls) -> tuple[Example, ...]:
        return (
            Example("def f():\n    x.pop(1)\n", "def f():\n    pass\n"),
            Example("def f():\n    a = 1; raise E\n", "def f():\n    pass; raise E\n"),
            Example("def f():\n    a = 1; raise E\n", "def f():\n    a = 1; pass\n", occurrence=1),
        )


class Provider:
    """Cosmic Ray's operator-provider interface for the two operators above."""

    _OPERATORS: dict[str, type[Operator]] = {
        "ReplaceString": ReplaceString,
        "RemoveStatement": RemoveStatement,
    }

    def __iter__(self) -> Iterator[str]:
        return iter(self._OPERATORS)

    def __getitem__(self, name: str) -> type[Operator]:
        return self._OPERATORS[name]
