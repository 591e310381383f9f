"""Benchmarks for torchvis: attribution methods against their floors and their peers, and the
training-loop overhead of the monitor. Run ``python -m benchmarks.attribution --help``."""
