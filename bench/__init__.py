"""Benchmarks: the proxy against the Docker distribution registry and nginx, on loopback.

``python -m bench [--quick]`` (or ``python bench/run.py``) starts a registry, nginx and the
proxy (also one with a blob cache), seeds an image, measures blob throughput (also from a cold
and a warm cache) and manifest request rates, then whole pulls with skopeo through the sandbox,
and writes a table, JSON and a chart. See ``bench/README.md``.
"""
