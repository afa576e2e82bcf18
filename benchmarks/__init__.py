"""Benchmarks and studies: each module runs as ``python -m benchmarks.NAME``."""
