"""`splitserve up` on an embedded local Ray (2 CPUs, 127.0.0.1), end to end:
the openai client against the Serve application with KV through the object
store, per-pool autoscaling on the pools' own signals, draining scale-down,
what the cluster listens on, and `splitserve down` leaving nothing behind.
The config is the shipped ray-laptop.yaml with smaller KV caches, lower
targets and shorter delays (tests/ray_cluster.py).

One cluster serves the module; the tests run in file order, because the
decode pool starts at 2 replicas and shrinks to 1 a few seconds after it is
ready (its KV cache is nearly empty): the drain test must catch that.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.procs import alive, listening_addresses
from tests.ray_cluster import (
    DECODE_DOWNSCALE_DELAY_S,
    RayUp,
    assert_served_greedy_by_its_prefill_pool,
)


@pytest.fixture(scope="module")
def ray_up(tmp_path_factory):
    from modelmaker import make_model

    tmp = tmp_path_factory.mktemp("ray_up")
    # A context long enough for streams that outlast a scale-down.
    model = make_model(tmp / "tiny8k", preset="tiny", max_position_embeddings=8192)
    cluster = RayUp(tmp, model)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_scale_down_drains_streams_in_flight(ray_up):
    """The decode pool starts at 2 and its policy wants 1: Serve stops one
    replica while it is streaming; every stream still finishes in full."""
    n_tokens = 4000
    body = {"max_tokens": n_tokens, "ignore_eos": True, "temperature": 0}
    results: list[httpx.Response] = []

    def one(i: int) -> httpx.Response:
        r = httpx.post(
            f"{ray_up.url}/v1/completions", json={**body, "prompt": f"story {i}"}, timeout=300
        )
        results.append(r)
        return r

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        # Both decode replicas take streams...
        deadline = time.monotonic() + 30
        while True:
            decode = ray_up.pools()["decode"]
            if len(decode) == 2 and all((w["running"] or 0) > 0 for w in decode):
                break
            assert time.monotonic() < deadline, f"streams not on both decode replicas: {decode}"
            time.sleep(0.2)
        # ...then one of them leaves the pool while its streams are running.
        deadline = time.monotonic() + DECODE_DOWNSCALE_DELAY_S + 60
        while len(ray_up.pools()["decode"]) != 1:
            assert time.monotonic() < deadline, "the decode pool never shrank"
            time.sleep(0.2)
        assert not all(f.done() for f in futures), "streams ended before the scale-down"
        responses = [f.result() for f in futures]
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == n_tokens
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_openai_client_greedy_equals_offline(ray_up):
    assert_served_greedy_by_its_prefill_pool(ray_up)
    # Replicas report their dtype as standalone workers do; the config asks for float32.
    for w in [*ray_up.pools()["prefill"], *ray_up.pools()["decode"]]:
        assert (w["dtype"], w["dtype_reason"]) == ("float32", "requested")


def test_prompt_burst_grows_prefill_pool_only_then_it_shrinks(ray_up):
    """Queued prompt tokens grow the prefill pool while the decode pool (KV
    cache far from its target) stays put; idle, the prefill pool shrinks back,
    and requests sent through the scale-down all succeed."""
    deadline = time.monotonic() + 60
    while [len(v) for v in ray_up.pools().values()] != [1, 1]:
        assert time.monotonic() < deadline, ray_up.pools()
        time.sleep(0.3)

    sizes: list[tuple[float, int, int]] = []
    watching = threading.Event()
    watching.set()

    def watch() -> None:
        while watching.is_set():
            pools = ray_up.pools()
            sizes.append((time.monotonic(), len(pools["prefill"]), len(pools["decode"])))
            time.sleep(0.2)

    prompt = " ".join(["splitserve"] * 600)  # ~600 tokens
    watcher = threading.Thread(target=watch, daemon=True)
    start = time.monotonic()
    print(f"\nburst of 256 prompts began at {time.strftime('%H:%M:%S')}")
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            codes = list(
                pool.map(
                    lambda i: (
                        httpx.post(
                            f"{ray_up.url}/v1/completions",
                            json={"prompt": f"{i} {prompt}", "max_tokens": 2},
                            timeout=300,
                        ).status_code
                    ),
                    range(256),
                )
            )
        assert codes == [200] * 256
        deadline = start + 120
        while not any(p == 2 for _, p, _ in sizes):
            assert time.monotonic() < deadline, "the prefill pool did not grow"
            time.sleep(0.2)
        grew = next(t for t, p, _ in sizes if p == 2) - start
        print(f"prefill pool 1 -> 2 replicas serving {grew:.1f}s after the burst began")
        assert all(d == 1 for _, _, d in sizes), "the decode pool moved"

        # Idle but for a trickle of requests, which must all succeed while
        # the second prefill replica drains and leaves.
        trickle: list[int] = []
        deadline = time.monotonic() + 90
        while sizes[-1][1] != 1:
            assert time.monotonic() < deadline, "the prefill pool did not shrink"
            r = httpx.post(
                f"{ray_up.url}/v1/completions",
                json={"prompt": prompt, "max_tokens": 4},
                timeout=60,
            )
            trickle.append(r.status_code)
        assert trickle and trickle == [200] * len(trickle)
    finally:
        watching.clear()
        watcher.join()


def test_object_store_holds_no_kv_once_requests_are_done(ray_up):
    gcs = json.loads(ray_up.state_file.read_text())["gcs_address"]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run(
        [ray_cli, "memory", "--address", gcs, "--stats-only"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", out)
    assert match, out
    # Hundreds of requests' KV went through the store above; none of it stays
    # (what is left is Serve's own bookkeeping).
    assert int(match[1]) == 0 and int(match[2]) < 32, out


def test_cluster_listens_on_loopback_only(ray_up):
    ray_up.record_pids()
    addresses = listening_addresses(ray_up.pids)
    assert addresses, "found no listening socket"
    assert addresses <= {"127.0.0.1", "::1"}, addresses


def test_down_stops_everything(ray_up):
    ray_up.record_pids()
    assert ray_up.down() == 0
    assert ray_up.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ray_up.pids):
        left = [pid for pid in ray_up.pids if alive(pid)]
        assert time.monotonic() < deadline, f"still running after down: {left}"
        time.sleep(0.5)
    assert "stopped" in ray_up.log()
