"""The results as JSON, a compact text table and a PNG chart."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HOPS = {
    "registry": "registry",
    "nginx": "nginx",
    "proxy": "proxy",
    "static": "nginx",
    "proxy-static": "proxy",
    "proxy-static-info": "proxy",
    "proxy-static-workers": "proxy",
}
LABELS = {
    "registry": "registry (direct)",
    "nginx": "nginx -> registry",
    "proxy": "proxy -> registry",
    "static": "nginx static (direct)",
    "proxy-static": "proxy -> nginx static",
    "proxy-static-info": "proxy -> nginx static, log info",
    "proxy-static-workers": "proxy -> nginx static, log info, a worker per core",
}

PULL_LABELS = {
    "registry": "registry direct (v2/<hash>)",
    "alias": "proxy, alias mode",
    "resolver-cold": "proxy, resolver, cold API cache",
    "resolver-warm": "proxy, resolver, warm API cache",
    "cache-cold": "proxy, cold blob cache",
    "cache-warm": "proxy, warm blob cache",
}

SHARED_LABELS = {
    "local": "proxy, a local cache per replica",
    "shared": "proxy, shared cache (S3 + Redis)",
    "distribution": "distribution proxy (v2/<hash>)",
}

CACHE_LABELS = {
    "registry": "registry (direct)",
    "proxy": "proxy, no cache",
    "cache-cold": "proxy, cold cache",
    "cache-warm": "proxy, warm cache",
}


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as indented JSON."""
    path.write_text(json.dumps(results, indent=2) + "\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """A compact plain-text summary."""
    settings = results["settings"]
    summary = results["summary"]
    blob = summary["blob"]
    lines: list[str] = []
    rounds = settings["rounds"]
    lines.append(
        f"Blob GET of {settings['blob_mib']} MiB (curl; median of {rounds} round(s); "
        "CPU of the serving hop)"
    )
    lines.append(f"{'':34}{'registry':>10}{'nginx':>10}{'proxy':>10}{'proxy/nginx':>13}")
    streams = settings["streams"]
    for kind, label in (("single", "1 stream"), ("parallel", f"{streams} streams aggregate")):
        values = [blob[t][f"{kind}_mb_per_s"] for t in ("registry", "nginx", "proxy")]
        lines.append(
            f"  {label + ', MB/s':32}"
            + "".join(f"{v:>10.0f}" for v in values)
            + f"{blob[f'proxy_vs_nginx_{kind}']:>13.2f}"
        )
        cpu = [blob[t][f"{kind}_hop_cpu_s_per_gib"] for t in ("registry", "nginx", "proxy")]
        lines.append(f"  {'  hop CPU s/GiB':32}" + "".join(f"{v:>10.2f}" for v in cpu))
        upstream = [blob[t].get(f"{kind}_upstream_cpu_s_per_gib") for t in ("nginx", "proxy")]
        lines.append(
            f"  {'  registry CPU s/GiB behind it':32}{'':10}"
            + "".join(f"{_fmt(v, 2):>10}" for v in upstream)
        )
    memory = results.get("proxy_memory_mib", {}).get("proxy", {})
    lines.append(
        f"proxy RSS: {_fmt(memory.get('rss_at_start'))} MiB at start, "
        f"{_fmt(blob['proxy'].get('parallel_peak_rss_mib'))} MiB peak sampled during blob runs, "
        f"VmHWM {_fmt(memory.get('hwm_at_end'))} MiB at end (after c=256)"
    )
    cache = results.get("cache")
    if cache:
        lines.append("")
        lines.extend(cache_table(cache["summary"], settings))
    if "pull" in results:
        lines.append("")
        lines.extend(pull_table(results["pull"]))
    if "shared" in results:
        lines.append("")
        lines.extend(shared_table(results["shared"]))
    lines.append("")
    lines.append(
        f"Manifest GET (wrk -t1, {settings['seconds']} s per run, median of {rounds} round(s))"
    )
    lines.append(
        f"{'target':32}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'hop CPU':>10}{'upstr CPU':>11}{'errors':>8}"
    )
    lines.append(f"{'':32}{'':>6}{'':>9}{'':>9}{'':>9}{'ms/req':>10}{'ms/req':>11}")
    for name, per_connections in summary["manifest"].items():
        label = f"{LABELS[name]} [{HOPS[name]}]"
        for connections, row in per_connections.items():
            lines.append(
                f"{label:32}{connections:>6}{row['rps']:>9.0f}{row['p50_ms']:>9.3f}"
                f"{row['p99_ms']:>9.3f}{row['hop_cpu_ms_per_req']:>10.3f}"
                f"{_fmt(row.get('upstream_cpu_ms_per_req'), 3):>11}{row['errors']:>8}"
            )
            label = ""
    added = summary["added_p50_ms_at_1_connection"]
    lines.append(
        "added p50 at 1 connection: "
        + ", ".join(f"{k.replace('_vs_', ' vs ')} {_fmt(v, 3)} ms" for k, v in added.items())
    )
    for key, ratios in summary["manifest_rps_ratios"].items():
        lines.append(
            f"req/s {key.removesuffix('_rps').replace('_vs_', ' / ')}: "
            + ", ".join(f"c={c} {r:.2f}" for c, r in ratios.items())
        )
    phases = results["phase_seconds"]
    lines.append("")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    profile = results.get("profile")
    if profile:
        for entry in profile.values():
            summary_ = entry["summary"]
            lines.append("")
            lines.append(
                f"py-spy, {entry['proxy']} during {entry['workload']} "
                f"({summary_['samples']} samples): top self time"
            )
            lines.extend(f"  {f['percent']:5.1f}%  {f['function']}" for f in summary_["self"][:10])
            lines.append("  self time by file:")
            lines.extend(
                f"  {f['percent']:5.1f}%  {f['file']}" for f in summary_["self_by_file"][:8]
            )
            lines.append("  inclusive:")
            lines.extend(
                f"  {f['percent']:5.1f}%  {f['function']}" for f in summary_["inclusive"][:12]
            )
    return "\n".join(lines)


def cache_table(summary: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The blob cache's table: per target MB/s, CPU s/GiB of the serving hop, the ratios."""
    lines = [
        f"Blob cache: GET of {settings['blob_mib']} MiB (curl, a new token per client; medians "
        f"of {settings['cache_rounds']} round(s) for 1 stream, {settings['rounds']} for "
        f"{settings['streams']}; exact CPU of the serving hop)",
        f"{'target':28}{'MB/s':>8}{'CPU s/GiB':>11}{'vs direct':>11}{'CPU vs':>9}{'registry':>10}",
        f"{'':28}{'':>8}{'':>11}{'':>11}{'uncached':>9}{'s/GiB':>10}",
    ]
    streams = settings["streams"]
    for kind, label in (("single", "1 stream"), ("parallel", f"{streams} streams aggregate")):
        lines.append(f"  {label}")
        for name, row in summary[kind].items():
            upstream = row["upstream_cpu_s_per_gib"]
            if name == "registry":
                upstream = row["hop_cpu_s_per_gib"]  # addressed directly, it is its own hop
            lines.append(
                f"    {CACHE_LABELS.get(name, name):26}{row['mb_per_s']:>8.0f}"
                f"{row['hop_cpu_s_per_gib']:>11.3f}{row['vs_direct']:>11.2f}"
                f"{_fmt(row['cpu_vs_uncached'], 2):>9}{_fmt(upstream, 3):>10}"
            )
    goals = summary["goals"]
    lines.append(
        f"goals, 1 stream: warm >= {goals['warm_vs_direct_goal']}x direct: "
        f"{goals['warm_vs_direct_single']:.2f}x "
        f"({'met' if goals['warm_vs_direct_met'] else 'not met'}); warm CPU <= "
        f"{goals['warm_cpu_vs_uncached_goal']}x uncached: "
        f"{_fmt(goals['warm_cpu_vs_uncached_single'], 2)}x "
        f"({'met' if goals['warm_cpu_vs_uncached_met'] else 'not met'})"
    )
    return lines


def pull_table(pull: dict[str, Any]) -> list[str]:
    """The whole pull's table: per target the median, range and spread of a ``skopeo copy``,
    what it adds over the registry direct, and the proxy's CPU per pull."""
    image = pull["image"]
    lines = [
        f"Whole pull: skopeo copy of {image['name']} ({image['layers']} layers, "
        f"{image['blobs']} blobs, {image['bytes'] / (1 << 20):.1f} MiB) to dir:, token auth; "
        f"median of {pull['samples']} sample(s)",
        f"{'target':34}{'median s':>9}{'min':>8}{'max':>8}{'spread':>8}{'added s':>9}"
        f"{'ratio':>7}{'proxy CPU s':>12}",
    ]
    for name, row in pull["summary"].items():
        lines.append(
            f"  {PULL_LABELS.get(name, name):32}{row['median_s']:>9.3f}{row['min_s']:>8.3f}"
            f"{row['max_s']:>8.3f}{row['spread_s']:>8.3f}{row['added_s']:>+9.3f}"
            f"{row['vs_direct']:>7.2f}{_fmt(row['proxy_cpu_s'], 3):>12}"
        )
    return lines


def shared_table(shared: dict[str, Any]) -> list[str]:
    """The shared-cache part's table: per setup and phase, the wall time of the concurrent
    pulls, the failed ones, and what upstream served for them."""
    if "skipped" in shared:
        return [f"Shared cache: skipped ({shared['skipped']})"]
    image = shared["image"]
    lines = [
        f"Shared cache: {shared['pulls']} concurrent skopeo copy of {image['name']} "
        f"({image['bytes'] / (1 << 20):.1f} MiB, a {image['layer_bytes'] / (1 << 20):.0f} MiB "
        f"layer) through HAProxy over {shared['replicas']} replicas; upstream from its access log",
        f"{'setup':36}{'phase':>6}{'wall s':>8}{'failed':>7}{'layer GETs':>11}"
        f"{'blob GETs':>10}{'upstream MiB':>13}{'per pulled':>11}",
    ]
    for run in shared["runs"]:
        lines.append(
            f"  {SHARED_LABELS.get(run['setup'], run['setup']):34}{run['phase']:>6}"
            f"{run['wall_s']:>8.1f}{run['failed']:>7}{run['upstream_layer_gets']:>11}"
            f"{run['upstream_blob_gets']:>10}{run['upstream_bytes'] / (1 << 20):>13.1f}"
            f"{_fmt(run['upstream_per_pulled'], 4):>11}"
        )
    return lines


def _use_agg() -> None:
    """Have matplotlib draw to files only (Agg), before pyplot is imported; ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")


def _on_grid(
    per_connections: dict[str, dict[str, float]], grid: list[int], key: str
) -> list[float]:
    """``key`` of a series at every connection count of ``grid``, NaN where it was not
    measured: matplotlib breaks a line at NaN, so no segment suggests a count never run."""
    return [
        float(per_connections[str(count)][key]) if str(count) in per_connections else math.nan
        for count in grid
    ]


def _subtitle(results: dict[str, Any]) -> str:
    settings = results["settings"]
    return (
        f"balena-registry-proxy, {settings['mode']} mode, "
        f"{results['machine']['cores']} cores shared by client and servers, "
        f"median of {settings['rounds']} round(s)"
    )


def manifest_figure(results: dict[str, Any]) -> Figure:
    """req/s and serving-hop CPU ms/request against connection count (log x), per target, with
    the legend below the plots. Each line has its target as ``gid``."""
    _use_agg()
    import matplotlib.pyplot as plt

    manifest: dict[str, dict[str, dict[str, float]]] = results["summary"]["manifest"]
    grid = sorted({int(count) for rows in manifest.values() for count in rows})
    figure, (rate_axis, cpu_axis) = plt.subplots(1, 2, figsize=(13, 6), layout="constrained")
    for name, per_connections in manifest.items():
        label = f"{LABELS[name]} [{HOPS[name]}]"
        if len(per_connections) < len(grid):
            label += f" (at {', '.join(per_connections)} only)"
        for axis, key in ((rate_axis, "rps"), (cpu_axis, "hop_cpu_ms_per_req")):
            axis.plot(
                grid,
                _on_grid(per_connections, grid, key),
                marker="o",
                label=label,
                gid=name,
            )
    for axis, title, ylabel in (
        (rate_axis, "Manifest GET throughput", "requests/s"),
        (cpu_axis, "CPU of the serving hop per request", "CPU ms/request"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(grid, [str(count) for count in grid])
        axis.set_xlabel("concurrent connections (wrk -t1)")
        axis.set_ylabel(ylabel + " (log)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = rate_axis.get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=3,
        fontsize=8,
        title="target [the hop whose CPU is counted]",
        title_fontsize=8,
    )
    figure.suptitle(
        f"{_subtitle(results)} x {results['settings']['seconds']} s per run", fontsize=10
    )
    return figure


def blob_figure(results: dict[str, Any]) -> Figure:
    """Blob throughput (MB/s) of one stream and of the parallel streams, per target: the relay
    runs, and the cache's runs when there are any, with the legend below the plots."""
    _use_agg()
    import matplotlib.pyplot as plt

    settings = results["settings"]
    streams = settings["streams"]
    blob = results["summary"]["blob"]
    panels: list[tuple[str, list[tuple[str, float, float]]]] = [
        (
            "Relay",
            [
                (LABELS[name], blob[name]["single_mb_per_s"], blob[name]["parallel_mb_per_s"])
                for name in ("registry", "nginx", "proxy")
            ],
        )
    ]
    cache = results.get("cache")
    if cache:
        summary = cache["summary"]
        panels.append(
            (
                "Blob cache",
                [
                    (
                        CACHE_LABELS.get(name, name),
                        row["mb_per_s"],
                        summary["parallel"][name]["mb_per_s"],
                    )
                    for name, row in summary["single"].items()
                ],
            )
        )
    figure, axes = plt.subplots(
        1, len(panels), figsize=(13, 6), layout="constrained", squeeze=False, sharey=True
    )
    width = 0.38
    for axis, (title, rows) in zip(axes[0], panels, strict=True):
        places = list(range(len(rows)))
        for offset, index, label in (
            (-width / 2, 1, "1 stream"),
            (width / 2, 2, f"{streams} streams, aggregate"),
        ):
            bars = axis.bar(
                [place + offset for place in places],
                [float(row[index]) for row in rows],
                width,
                label=label,
                color="tab:blue" if index == 1 else "tab:orange",
            )
            axis.bar_label(bars, fmt="{:,.0f}", fontsize=8, padding=2)
        axis.set_xticks(places, [row[0].replace(", ", ",\n") for row in rows])
        axis.set_title(f"{title}: GET of a {settings['blob_mib']} MiB blob (curl)")
        axis.grid(True, axis="y", alpha=0.3)
        axis.margins(y=0.12)
    axes[0][0].set_ylabel("MB/s (10^6 bytes per second)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    title = _subtitle(results)
    if cache:
        title += f" ({settings['cache_rounds']} for the cache's single stream)"
    figure.suptitle(title, fontsize=10)
    return figure


def blob_chart_path(path: Path) -> Path:
    """Where :func:`chart` puts the blob chart beside the manifest chart at ``path``."""
    return path.with_name(f"{path.stem}-blobs{path.suffix}")


def chart(results: dict[str, Any], path: Path) -> list[Path]:
    """Write the manifest chart to ``path`` and the blob chart beside it; the paths written
    (none when matplotlib is missing)."""
    try:
        _use_agg()
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return []
    written: list[Path] = []
    for figure, target in (
        (manifest_figure(results), path),
        (blob_figure(results), blob_chart_path(path)),
    ):
        figure.savefig(target, dpi=110)
        plt.close(figure)
        written.append(target)
    return written


# The table of each part that runs alone (``python -m bench --only <part>``).
ONLY_TABLES = {"pull": pull_table, "shared": shared_table}


def main(arguments: list[str] | None = None) -> None:
    """``python -m bench.report RESULTS.json``: the table and the charts of a finished run
    again, from its JSON (the charts beside it, as ``RESULTS.png`` and ``RESULTS-blobs.png``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results JSON file of python -m bench")
    parser.add_argument("--chart", type=Path, help="manifest chart path (default: RESULTS.png)")
    args = parser.parse_args(arguments)
    results = json.loads(args.results.read_text())
    only = results.get("only")
    if only in ONLY_TABLES:
        print("\n".join(ONLY_TABLES[only](results[only])))
        return
    print(table(results))
    for path in chart(results, args.chart or args.results.with_suffix(".png")):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
