"""Workers that come and go: the router finds them through DNS (a
Kubernetes headless Service in production, `localhost` here) or any other
discovery function, and a worker told to stop (SIGTERM, as Kubernetes does
on scale-down) drains: it refuses new requests and finishes the ones it has.
Real worker and router processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from router.discovery import dns_discovery, resolve_all, split_host_port
from router.pool import WorkerPool
from tests.cluster import free_port


def test_dns_names_resolve_to_every_address():
    assert asyncio.run(resolve_all("127.0.0.1:50051")) == ["127.0.0.1:50051"]
    assert "127.0.0.1:7" in asyncio.run(resolve_all("localhost:7"))
    assert asyncio.run(resolve_all("no-such-host.invalid:1")) == []
    with pytest.raises(ValueError, match="NAME:PORT"):
        split_host_port("no-port")
    with pytest.raises(ValueError, match="NAME:PORT"):
        dns_discovery(decode="host:notaport")


def test_pool_follows_discovery():
    """Joining workers are added; leaving ones take no new requests, and
    their channel stays open until their last call ends."""
    members: dict[str, list[str]] = {"decode": ["127.0.0.1:1", "127.0.0.1:2"], "prefill": []}

    async def discover() -> tuple[list[str], list[str]]:
        return members["decode"], members["prefill"]

    async def scenario() -> None:
        pool = WorkerPool([], [], discover=discover, poll_timeout_s=0.2)
        await pool.start()
        try:
            assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:2"]
            leaving = pool.decode[1]
            leaving.in_flight = 1  # a stream still open on it
            members["decode"] = ["127.0.0.1:1", "127.0.0.1:3"]
            members["prefill"] = ["127.0.0.1:4"]
            await pool.poll_all()
            assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:3"]
            assert [w.address for w in pool.prefill] == ["127.0.0.1:4"]
            assert not leaving.healthy and leaving.channel is not None
            assert pool.pick_decode(10, set()) is not leaving
            leaving.in_flight = 0  # its stream ended
            await pool.poll_all()
            assert leaving.channel is None

            # A discovery that fails keeps the last membership.
            async def broken() -> tuple[list[str], list[str]]:
                raise OSError("dns down")

            pool.discover = broken
            await pool.poll_all()
            assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:3"]
            assert pool.last_discovery_error is not None and "dns down" in pool.last_discovery_error
        finally:
            await pool.close()

    asyncio.run(scenario())


def _start_worker(model: Path, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    ready = tmp / f"worker-{port}.json"
    cmd = [sys.executable, "-m", "decode_worker", "--colocated", "--model", str(model)]
    cmd += ["--port", str(port), "--ready-file", str(ready), "--kv-cache-mib", "16"]
    cmd += ["--dtype", "float32", "--drain-timeout", "60"]
    log = open(tmp / f"w{port}.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, (tmp / f"w{port}.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_router_finds_workers_by_dns_and_a_stopping_worker_drains(tmp_path):
    from modelmaker import make_model

    # A context long enough for a stream that outlasts the checks below.
    model = make_model(tmp_path / "tiny8k", preset="tiny", max_position_embeddings=8192)
    worker_port, router_port = free_port(), free_port()
    worker = _start_worker(model, tmp_path, worker_port)
    url = f"http://127.0.0.1:{router_port}"
    cmd = [sys.executable, "-m", "router", "--model", str(model), "--port", str(router_port)]
    cmd += ["--decode-dns", f"127.0.0.1:{worker_port}", "--poll-interval", "0.2"]
    router = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router never saw the worker"
            time.sleep(0.2)

        # A long stream is running when the worker is told to stop.
        body = {"prompt": "drain me", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        events: list[dict] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        worker.send_signal(signal.SIGTERM)
        # Draining: a new request is refused (the router has nowhere else to
        # send it); one sent before the signal was handled is still served.
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(
                f"{url}/v1/completions", json={"prompt": "new", "max_tokens": 4}, timeout=30
            )
            if r.status_code != 200:
                break
            assert time.monotonic() < deadline, "the worker never began draining"
        assert r.status_code == 503, r.text
        assert worker.poll() is None and reader.is_alive()  # it was draining, not gone
        reader.join(timeout=180)
        # ...and the stream it had finishes in full.
        reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert reasons[-1] == "length" and reasons.count("length") == 1
        assert any("splitserve_timings" in e for e in events)
        assert worker.wait(timeout=60) == 0
    finally:
        for proc in (router, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
