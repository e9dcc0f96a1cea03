"""Analyses on top of the models' outputs (e.g. the MLLM comparison: python -m analysis.mllm)."""
