"""Cosmic Ray's command line with this project's two extra operators, plus two commands of its
own. Runs in the mutation tools' venv (``make mutation`` makes it), never in the project's:

    python -m mutation.engine <cosmic-ray command and arguments>
    python -m mutation.engine skip-annotations SESSION   mutants inside type annotations: skipped
    python -m mutation.engine filter-operators SESSION CONFIG   Cosmic Ray's operators filter
    python -m mutation.engine check-operators            the extra operators' examples hold
"""

from __future__ import annotations

import sys
from pathlib import Path

import cosmic_ray.plugins
import parso
import parso.tree
from cosmic_ray.cli import main as cosmic_ray_main
from cosmic_ray.mutating import mutate_code
from cosmic_ray.tools.filters import operators_filter
from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

from .operators import Provider, in_annotation

PROVIDER = "project"
cosmic_ray.plugins.OPERATOR_PROVIDERS[PROVIDER] = Provider()


def skip_annotations(session: str) -> int:
    """Mark every pending mutant whose position lies in a type annotation as skipped: with
    ``from __future__ import annotations`` none is ever evaluated, so each would survive."""
    trees: dict[str, parso.tree.BaseNode] = {}
    skipped = 0
    with use_db(session) as database:
        for item in list(database.pending_work_items):
            for mutation in item.mutations:
                path = str(mutation.module_path)
                if path not in trees:
                    trees[path] = parso.parse(Path(path).read_text(encoding="utf-8"))
                leaf = trees[path].get_leaf_for_position(tuple(mutation.start_pos))
                if leaf is not None and in_annotation(leaf):
                    result = WorkResult(
                        output="in a type annotation", worker_outcome=WorkerOutcome.SKIPPED
                    )
                    database.set_result(item.job_id, result)
                    skipped += 1
                    break
    print(f"{skipped} mutants in type annotations skipped")
    return 0


def check_operators() -> int:
    """Apply each extra operator to its examples; a wrong mutation fails."""
    provider = Provider()
    failures = 0
    for name in provider:
        operator = provider[name]
        for example in operator.examples():
            mutated = mutate_code(example.pre_mutation_code, operator(), example.occurrence)
            if mutated != example.post_mutation_code:
                print(f"{name}: {example.pre_mutation_code!r} gave {mutated!r}")
                failures += 1
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["skip-annotations"] and len(argv) == 2:
        return skip_annotations(argv[1])
    if argv[:1] == ["filter-operators"]:
        result: int = operators_filter.main(argv[1:])
        return result
    if argv == ["check-operators"]:
        return check_operators()
    status: int = cosmic_ray_main(argv)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
