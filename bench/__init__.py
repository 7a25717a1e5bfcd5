"""Benchmarks. ``python -m bench [name ...]`` runs ``bench/bench_<name>.py`` modules and records results."""
