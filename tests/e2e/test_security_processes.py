"""Workers let in only the cluster, with real processes:

- mTLS: a port with TLS files takes only clients whose certificate the
  cluster's CA signed (a throwaway CA made here, for 127.0.0.1).
- A decode worker dials only the prefill workers it knows; a socket of the
  test's own, named in a request, never sees a connection, and the request
  still completes.
- `splitserve serve`: workers get the launch's secret through their
  environment (never their command line) and refuse callers without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from engine import LLM, SamplingParams
from kvtransfer.security import ClusterSecurity, secure_channel
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from router.pool import WorkerPool
from tests.cluster import ServeCluster, WorkerProcess
from tests.security_kit import SECRET, SERVING, UNAUTHENTICATED, health_status
from worker.wire import params_to_pb

ENGINE = ["--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1", "--metrics-port", "0"]


def Proc(
    module: str, model: Path, tmp: Path, name: str, *extra: str, secret: str | None
) -> WorkerProcess:
    """A worker of this file's engine size."""
    return WorkerProcess(module, model, tmp, *ENGINE, *extra, name=name, secret=secret)


@contextlib.contextmanager
def processes(*procs: WorkerProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def offline(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=16 << 20)


@pytest.fixture
def stranger() -> Iterator[socket.socket]:
    """A listening socket of the test's own on 127.0.0.1: no worker knows it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def was_dialled(sock: socket.socket) -> bool:
    """A connection is waiting to be accepted (the kernel took it for us)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


PROMPT = "Once upon a time"
MAX_TOKENS = 6


def generate(
    address: str, security: ClusterSecurity, prompt_ids: list[int], prefill: list[str], rid: str
) -> tuple[list[int], pb.Timings]:
    """A Generate call as the router makes it; (tokens, the final timings)."""
    params = params_to_pb(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    req = pb.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt_ids, sampling_params=params,
        prefill_addresses=prefill,
    )  # fmt: skip

    async def run() -> tuple[list[int], pb.Timings]:
        tokens: list[int] = []
        timings = pb.Timings()
        async with secure_channel(address, security) as ch:
            async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(req, timeout=120):
                tokens.extend(msg.token_ids)
                if msg.finish_reason:
                    timings = msg.timings
        return tokens, timings

    return asyncio.run(run())


def status_code(address: str, security: ClusterSecurity, stub: type) -> grpc.StatusCode:
    async def ask() -> grpc.StatusCode:
        async with secure_channel(address, security) as ch:
            try:
                await stub(ch).Status(pb.StatusRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    return asyncio.run(ask())


def health_of(address: str, service: str) -> int:
    async def ask() -> int:
        async with grpc.aio.insecure_channel(address) as ch:
            return await health_status(ch, service)

    return asyncio.run(ask())


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def expected_tokens(offline: LLM) -> tuple[list[int], list[int]]:
    tok = offline.engine.tokenizer
    ids = tok.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return ids, list(offline.generate([ids], params, use_tqdm=False)[0].token_ids)


def test_workers_with_a_secret_refuse_strangers_and_dial_only_known_prefill_workers(
    tiny_llama, tmp_path, stranger, offline
):
    """P and D share a secret and D knows P. A call without the secret (or
    with another) is refused, health answers anyone, the secret is on no
    command line, and a request that names the test's socket before P is
    prefilled by P without the socket ever seeing a connection."""
    prefill = Proc("prefill_worker", tiny_llama, tmp_path, "p", secret=SECRET)
    decode = Proc(
        "decode_worker", tiny_llama, tmp_path, "d",
        "--prefill-addresses", prefill.address, secret=SECRET,
    )  # fmt: skip
    with processes(decode, prefill):
        right = ClusterSecurity(secret=SECRET)
        for worker, stub in (
            (prefill, pb_grpc.PrefillWorkerStub),
            (decode, pb_grpc.DecodeWorkerStub),
        ):
            assert status_code(worker.address, right, stub) == grpc.StatusCode.OK
            for caller in (ClusterSecurity(), ClusterSecurity(secret=SECRET[::-1])):
                assert status_code(worker.address, caller, stub) == UNAUTHENTICATED
            for service in ("", "liveness"):  # Kubernetes' probes: no metadata
                assert health_of(worker.address, service) == SERVING
            assert not any(SECRET in arg for arg in cmdline(worker.proc.pid))
            assert "accepts only the cluster" in worker.log()
            assert "unauthenticated" not in worker.log()

        ids, want = expected_tokens(offline)
        named = [address_of(stranger), prefill.address]
        # Without the secret, nothing: not even the dial.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            generate(decode.address, ClusterSecurity(), ids, named, "no-secret")
        assert refused.value.code() == UNAUTHENTICATED
        tokens, timings = generate(decode.address, right, ids, named, "named-a-stranger")
        assert tokens == want
        assert timings.prefill_address == prefill.address, "prefilled by the known worker"
        assert not was_dialled(stranger), "the decode worker dialled an address it does not know"
        assert decode.metric("splitserve_decode_prefill_unknown_total") == 1
        assert decode.metric("splitserve_decode_local_prefills_total") == 0
        assert "not a prefill worker this cluster knows" in decode.log()
        assert SECRET not in decode.log() + prefill.log()


def test_a_decode_worker_that_knows_no_prefill_worker_prefills_itself_and_says_its_port_is_open(
    tiny_llama, tmp_path, stranger, offline
):
    decode = Proc("decode_worker", tiny_llama, tmp_path, "d-open", secret=None)
    with processes(decode):
        assert "is unauthenticated" in decode.log()
        ids, want = expected_tokens(offline)
        tokens, timings = generate(
            decode.address, ClusterSecurity(), ids, [address_of(stranger)], "manual-run"
        )
        assert tokens == want
        assert not timings.prefill_address, "prefilled here, by nobody else"
        assert not was_dialled(stranger)
        assert decode.metric("splitserve_decode_prefill_unknown_total") == 1
        assert decode.metric("splitserve_decode_local_prefills_total") == 1
        assert "no prefill workers are configured" in decode.log()


def test_mtls_workers_serve_the_router_and_each_other_only_over_mtls(
    tiny_llama, tmp_path, pki, offline
):
    """P and D with the cluster certificate and the secret: the router's pool
    polls both over mTLS, D fetches the KV from P over mTLS, and a
    plaintext caller gets nowhere."""
    prefill = Proc("prefill_worker", tiny_llama, tmp_path, "p-tls", *pki.argv(), secret=SECRET)
    decode = Proc(
        "decode_worker", tiny_llama, tmp_path, "d-tls",
        *pki.argv(), "--prefill-addresses", prefill.address, secret=SECRET,
    )  # fmt: skip
    with processes(decode, prefill):
        security = pki.security(SECRET)

        async def poll() -> list[tuple[bool, str | None]]:
            pool = WorkerPool([decode.address], [prefill.address], security=security)
            await pool.start()
            try:
                return [(w.healthy, w.last_error) for w in pool.workers]
            finally:
                await pool.close()

        assert asyncio.run(poll()) == [(True, None), (True, None)]
        ids, want = expected_tokens(offline)
        tokens, timings = generate(decode.address, security, ids, [prefill.address], "tls-1")
        assert tokens == want
        assert timings.prefill_address == prefill.address
        assert timings.kv_transfer_bytes > 0
        for caller in (ClusterSecurity(secret=SECRET), pki.security()):  # no TLS; no secret
            code = status_code(decode.address, caller, pb_grpc.DecodeWorkerStub)
            assert code in (grpc.StatusCode.UNAVAILABLE, UNAUTHENTICATED)
        assert status_code(decode.address, pki.security(), pb_grpc.DecodeWorkerStub) == (
            UNAUTHENTICATED
        )


def test_splitserve_serve_hands_its_secret_to_the_workers_through_the_environment(
    tiny_llama, tmp_path
):
    cluster = ServeCluster(
        tiny_llama, tmp_path / "serve.log",
        "--prefill", "1", "--decode", "1",
        "--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1",
    )  # fmt: skip
    try:
        model = httpx.get(f"{cluster.url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 4}
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        workers = {w["role"]: w for w in cluster.cluster()["workers"]}
        timings = r.json()["splitserve_timings"]
        assert timings["prefill_worker"] == workers["prefill"]["address"], timings
        for role, stub in (
            ("prefill", pb_grpc.PrefillWorkerStub),
            ("decode", pb_grpc.DecodeWorkerStub),
        ):
            address = workers[role]["address"]
            assert status_code(address, ClusterSecurity(), stub) == UNAUTHENTICATED
            assert status_code(address, cluster.security, stub) == grpc.StatusCode.OK
            argv = cmdline(workers[role]["pid"])
            assert not any(cluster.secret in arg for arg in argv), f"{role}: secret in argv"
        decode_argv = cmdline(workers["decode"]["pid"])
        # The only prefill worker it may dial: the one the launcher listed for it.
        listing = Path(decode_argv[decode_argv.index("--prefill-addresses-file") + 1])
        assert listing.read_text().split() == [workers["prefill"]["address"]]
    finally:
        assert cluster.stop() == []
    assert cluster.secret not in cluster.log_path.read_text(errors="replace")
