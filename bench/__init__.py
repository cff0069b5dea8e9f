"""Benchmarks and the load generator behind `splitserve bench`."""
