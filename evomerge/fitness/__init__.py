"""Proxy benchmarks: the native batched scorer, the lm-eval adapter, the zoo's tasks."""
