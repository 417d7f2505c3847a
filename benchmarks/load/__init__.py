"""The load suite (docs/load.md): ``python -m benchmarks.load``."""
