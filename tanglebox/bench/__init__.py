"""Benchmarks: run a module with ``python -m tanglebox.bench.<name>``; results in docs/benchmarks.md."""
