"""bench/report.py's charts, drawn from the committed full run (docs/benchmark/results.json):
no line across a connection count a series was not measured at, no legend over a plot, and
every blob throughput of the run in the blob chart.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench import report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmark"


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DOCS / "results.json").read_text())
    return loaded


def measured(results: dict[str, Any]) -> dict[str, list[int]]:
    """The connection counts each manifest series was run at."""
    manifest: dict[str, dict[str, Any]] = results["summary"]["manifest"]
    return {name: sorted(int(count) for count in rows) for name, rows in manifest.items()}


def test_the_committed_run_has_a_series_measured_at_fewer_counts(
    results: dict[str, Any],
) -> None:
    counts = measured(results)
    assert counts["proxy-static-info"] == [1, 64] != counts["proxy"]


def test_no_line_spans_a_count_that_was_not_measured(results: dict[str, Any]) -> None:
    counts = measured(results)
    grid = sorted({count for series in counts.values() for count in series})
    figure = report.manifest_figure(results)
    lines = [line for axis in figure.axes for line in axis.get_lines()]
    assert sorted(str(line.get_gid()) for line in lines) == sorted(2 * list(counts))
    for line in lines:
        xs = np.asarray(line.get_xdata(), dtype=float).tolist()
        ys = np.asarray(line.get_ydata(), dtype=float).tolist()
        points = list(zip(xs, ys, strict=True))
        drawn = [int(x) for x, y in points if math.isfinite(y)]
        assert drawn == counts[str(line.get_gid())], line.get_gid()
        for (x1, y1), (x2, y2) in itertools.pairwise(points):
            if math.isfinite(y1) and math.isfinite(y2):
                # A segment joins neighbours on the axis, never skips a count.
                assert grid.index(int(x2)) == grid.index(int(x1)) + 1, (line.get_gid(), x1, x2)


def covered_by_a_legend(figure: Figure) -> list[str]:
    """The plots (with their titles, ticks and labels) that a legend of ``figure`` overlaps."""
    figure.canvas.draw()
    legends = [*figure.legends, *(axis.get_legend() for axis in figure.axes)]
    covered: list[str] = []
    for legend in legends:
        if legend is None:
            continue
        box = legend.get_window_extent()
        for axis in figure.axes:
            plot = axis.get_tightbbox()
            assert plot is not None
            if box.overlaps(plot):
                covered.append(axis.get_title())
    return covered


def test_legends_cover_no_plot(results: dict[str, Any]) -> None:
    for figure in (report.manifest_figure(results), report.blob_figure(results)):
        assert figure.legends, "no legend"
        assert covered_by_a_legend(figure) == []


def test_the_blob_chart_shows_every_throughput_of_the_run(results: dict[str, Any]) -> None:
    blob = results["summary"]["blob"]
    cache = results["cache"]["summary"]
    expected = [
        *(
            blob[name][f"{kind}_mb_per_s"]
            for name in ("registry", "nginx", "proxy")
            for kind in ("single", "parallel")
        ),
        *(
            cache[kind][name]["mb_per_s"]
            for name in cache["single"]
            for kind in ("single", "parallel")
        ),
    ]
    figure = report.blob_figure(results)
    bars = [patch for axis in figure.axes for patch in axis.patches]
    heights = [bar.get_height() for bar in bars if isinstance(bar, Rectangle)]
    assert len(heights) == len(bars)
    assert sorted(heights) == pytest.approx(sorted(expected))


def test_chart_writes_both_charts(results: dict[str, Any], tmp_path: Path) -> None:
    written = report.chart(results, tmp_path / "run.png")
    assert written == [tmp_path / "run.png", tmp_path / "run-blobs.png"]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")


def test_the_docs_show_both_charts() -> None:
    text = (DOCS / "README.md").read_text()
    for name in ("results.png", report.blob_chart_path(Path("results.png")).name):
        assert (DOCS / name).is_file(), name
        assert f"]({name})" in text, f"docs/benchmark/README.md does not show {name}"
