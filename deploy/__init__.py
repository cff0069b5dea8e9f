"""Bringing splitserve up: the `splitserve` command line."""
