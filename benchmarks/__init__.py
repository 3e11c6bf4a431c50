"""The segvit benchmark suite: ``python -m benchmarks``."""
