"""Speed benchmarks (docs/PERFORMANCE.md); run from the repo root as ``python -m bench.<script>``."""
