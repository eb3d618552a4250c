"""Benchmarking: `kbench compare` and the native reference loops it measures Keras against."""
