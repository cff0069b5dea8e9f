"""The two clusters the API tests share (session-wide: starting one costs
seconds): `splitserve serve` with 1 prefill + 1 decode worker, and with one
colocated worker, on the tiny test model in float32; and the offline engine
that is their reference."""

from __future__ import annotations

import pytest

from engine import LLM
from tests.cluster import ServeCluster

WORKER_ARGS = ("--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1")


@pytest.fixture(scope="session")
def disagg(tiny_llama, tmp_path_factory):
    c = ServeCluster(tiny_llama, tmp_path_factory.mktemp("logs") / "disagg.log", *WORKER_ARGS)
    yield c
    assert c.stop() == [], "workers outlived their cluster"


@pytest.fixture(scope="session")
def colocated(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "colocated.log"
    # Tokens every 3 (the first at once): output must not change.
    c = ServeCluster(tiny_llama, log, "--colocated", "1", "--stream-interval", "3", *WORKER_ARGS)
    yield c
    assert c.stop() == [], "workers outlived their cluster"


@pytest.fixture(scope="session")
def offline(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=16 << 20)
