"""A dead engine is a dead process, and a dead process is replaced.

Real processes on 127.0.0.1: a worker whose engine thread dies (made to, by
the SPLITSERVE_FAULT_ENGINE_STEP fault-injection hook, as a bug would) ends
every open stream with an error and exits with EXIT_ENGINE_DIED; workers
answer grpc.health.v1; `splitserve serve` starts a killed worker again on
its address, counts it on /cluster and in its metrics, and serves again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.cluster import ServeCluster, free_port
from worker.process import EXIT_ENGINE_DIED, FAULT_STEP_ENV, LIVENESS_SERVICE
from worker.wire import params_to_pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DECODE_SERVICE = pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
ENGINE = ("--dtype", "float32", "--kv-cache-mib", "8", "--threads", "1")


def health(address: str, service: str = "") -> int:
    """grpc.health.v1 Check, as Kubernetes' gRPC probe sends it."""
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def start_worker(model: Path, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A colocated worker process; (process, address) once it is ready."""
    ready = tmp_path / "worker.ready"
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - the child holds it
    cmd = [sys.executable, "-m", "decode_worker", "--colocated", "--model", str(model)]
    cmd += ["--port", str(free_port()), "--metrics-port", "-1", "--ready-file", str(ready)]
    proc = subprocess.Popen(
        [*cmd, *ENGINE], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    log.close()
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((tmp_path / "worker.log").read_text())
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["address"]


async def stream_until_end(address: str, rid: str, max_tokens: int) -> tuple[int, grpc.RpcError]:
    """Open a Generate stream; (tokens received, the error that ended it).
    A stream that ends without an error fails the test."""
    params = params_to_pb(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=[5, 6, 7, 8], sampling_params=params)
    tokens = 0
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            # The deadline only bounds a broken test; the error must come first.
            async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(req, timeout=120):
                tokens += len(msg.token_ids)
        except grpc.aio.AioRpcError as e:
            return tokens, e
    raise AssertionError(f"stream {rid} finished ({tokens} tokens) although the engine died")


def test_a_worker_whose_engine_dies_fails_its_streams_and_exits(tiny_llama, tmp_path):
    proc, address = start_worker(tiny_llama, tmp_path, {FAULT_STEP_ENV: "6"})
    try:
        # Alive and idle (no step has run yet): every health service is SERVING.
        for service in ("", DECODE_SERVICE, LIVENESS_SERVICE):
            assert health(address, service) == SERVING, service

        async def three_streams() -> list[tuple[int, grpc.RpcError]]:
            return await asyncio.gather(
                *(stream_until_end(address, f"doomed-{i}", 200) for i in range(3))
            )

        for tokens, error in asyncio.run(three_streams()):
            assert tokens < 200
            assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert "engine" in (error.details() or ""), error
        # The process does not linger as a worker that refuses everything.
        assert proc.wait(timeout=60) == EXIT_ENGINE_DIED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "worker.log").read_text()
    assert f"exits with code {EXIT_ENGINE_DIED}" in log, log[-3000:]


def test_a_draining_worker_is_not_ready_but_alive(tmp_path):
    """What SIGTERM does to health: readiness fails (Kubernetes stops sending
    requests), liveness holds (a restart would cut the streams it finishes)."""
    from worker.process import WorkerLife

    async def scenario() -> None:
        server = grpc.aio.server()
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        life = WorkerLife(DECODE_SERVICE)
        await life.attach(server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)

                async def check(service: str) -> int:
                    req = health_pb2.HealthCheckRequest(service=service)
                    return int((await stub.Check(req, timeout=10)).status)

                assert await check("") == NOT_SERVING  # loading: not ready yet
                assert await check(LIVENESS_SERVICE) == SERVING
                args = SimpleNamespace(ready_file=str(tmp_path / "ready"))
                waiting = asyncio.create_task(life.announce_and_wait(args, "decode", address, 0))
                while not (tmp_path / "ready").exists():
                    await asyncio.sleep(0.05)
                for service in ("", DECODE_SERVICE, LIVENESS_SERVICE):
                    assert await check(service) == SERVING, service
                life.stop.set()  # what SIGTERM does
                await waiting
                assert await check("") == NOT_SERVING
                assert await check(DECODE_SERVICE) == NOT_SERVING
                assert await check(LIVENESS_SERVICE) == SERVING
                assert life.exit_code == 0
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_a_bad_fault_injection_value_is_a_clean_error(tiny_llama, tmp_path):
    with pytest.raises(RuntimeError, match=FAULT_STEP_ENV):
        start_worker(tiny_llama, tmp_path, {FAULT_STEP_ENV: "soon"})


def test_ray_replica_fails_its_health_check_once_its_engine_died(tiny_llama):
    """Serve replaces a replica whose check_health raises (deploy/ray_replicas.py)."""
    from deploy.ray_replicas import DecodeReplica
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    async def scenario() -> None:
        config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
        engine = LLMEngine(config)

        def bug(_step: object) -> None:
            raise RuntimeError("a bug in the engine loop")

        aengine = AsyncEngine(engine, asyncio.get_running_loop(), on_step=bug)
        # The replica's check, on its state (the replica itself needs Ray).
        replica = SimpleNamespace(aengine=aengine)
        aengine.start()
        DecodeReplica.check_health(replica)  # alive
        q = aengine.add_request(engine.make_request([1, 2, 3], SamplingParams(max_tokens=4), "r"))
        delta = await asyncio.wait_for(q.get(), 60)
        while delta.error is None:  # the first step's token may come first
            assert delta.finished is None, "the request finished although the engine died"
            delta = await asyncio.wait_for(q.get(), 60)
        with pytest.raises(RuntimeError, match="a bug in the engine loop"):
            DecodeReplica.check_health(replica)
        aengine.stop()

    asyncio.run(scenario())


# -- splitserve serve as the supervisor ----------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "supervisor.log"
    c = ServeCluster(tiny_llama, log, "--prefill", "1", "--decode", "1", *ENGINE)
    yield c
    assert c.stop() == [], "workers outlived their cluster"


def completion_ok(cluster: ServeCluster) -> bool:
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def router_metric(cluster: ServeCluster, line_start: str) -> float | None:
    for line in httpx.get(f"{cluster.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_workers_answer_grpc_health_checks(cluster):
    for w in cluster.cluster()["workers"]:
        assert health(w["address"]) == SERVING
        assert health(w["address"], LIVENESS_SERVICE) == SERVING


def test_a_killed_worker_is_started_again_on_its_address(cluster):
    state = cluster.cluster()
    assert state["restarts_total"] == 0
    assert all(w["restarts"] == 0 for w in state["workers"])
    assert completion_ok(cluster)
    (decode,) = cluster.workers("decode")
    os.kill(decode["pid"], signal.SIGKILL)

    # Bounded only so that a broken launcher fails the test instead of hanging it.
    deadline = time.monotonic() + 180
    while True:
        (back,) = cluster.workers("decode")
        if back["healthy"] and back["pid"] not in (None, decode["pid"]):
            break
        assert time.monotonic() < deadline, f"the decode worker never came back:\n{cluster.log()}"
        time.sleep(0.3)
    cluster.worker_pids.append(back["pid"])  # stop() must end it too

    assert back["address"] == decode["address"]
    assert back["restarts"] == 1
    (prefill,) = cluster.workers("prefill")
    assert prefill["restarts"] == 0
    assert cluster.cluster()["restarts_total"] == 1
    assert router_metric(cluster, 'splitserve_worker_restarts_total{role="decode"}') == 1
    assert router_metric(cluster, 'splitserve_worker_restarts_total{role="prefill"}') == 0
    assert health(back["address"]) == SERVING
    assert completion_ok(cluster)
    log = cluster.log_path.read_text(errors="replace")
    assert f"exited with code {-signal.SIGKILL}" in log and "restart 1" in log, log[-4000:]
