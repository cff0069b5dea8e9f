"""Workers let in only the cluster (kvtransfer/security.py).

- The shared secret: gRPC servers built by make_server refuse every call
  without it (every call shape), serve grpc.health.v1 to anyone, and
  channels from secure_channel carry it on every call shape.
- mTLS: a port with TLS files takes only clients whose certificate the
  cluster's CA signed (a throwaway CA made here, for 127.0.0.1).
- Real worker processes: a decode worker dials only the prefill workers it
  knows; a socket of the test's own, named in a request, never sees a
  connection, and the request still completes.
- `splitserve serve`: workers get the launch's secret through their
  environment (never their command line) and refuse callers without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import select
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import LLM, SamplingParams
from kvtransfer.channels import SERVER_OPTIONS
from kvtransfer.security import (
    SECRET_ENV,
    SECRET_METADATA,
    ClusterSecurity,
    KnownPeers,
    TlsFiles,
    add_port,
    add_security_args,
    launch_secret,
    make_server,
    secure_channel,
)
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from protos.convert import params_to_pb
from router.pool import WorkerPool
from tests.cluster import ServeCluster, WorkerProcess

SECRET = "a-test-secret-of-the-cluster-0123"
ENGINE = ["--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1", "--metrics-port", "0"]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# -- an in-process server of every call shape -------------------------------------


def _echo_service() -> grpc.GenericRpcHandler:
    """A service of the test's own, one method per call shape, on raw bytes:
    what the security layer must guard whatever the method."""

    async def unary(request: bytes, context: object) -> bytes:
        return request

    async def server_stream(request: bytes, context: object) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield request

    async def client_stream(requests: AsyncIterator[bytes], context: object) -> bytes:
        return b"".join([r async for r in requests])

    async def bidi(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@dataclass
class Calls:
    """One call of each shape over a channel, as the workers' stubs make them."""

    channel: grpc.aio.Channel

    async def unary(self) -> bytes:
        return bytes(await self.channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10))

    async def server_stream(self) -> list[bytes]:
        call = self.channel.unary_stream("/test.Echo/ServerStream")(b"y", timeout=10)
        return [bytes(m) async for m in call]

    async def client_stream(self) -> bytes:
        async def gen() -> AsyncIterator[bytes]:
            for part in (b"a", b"b"):
                yield part

        return bytes(await self.channel.stream_unary("/test.Echo/ClientStream")(gen(), timeout=10))

    async def bidi(self) -> list[bytes]:
        # As the decode worker drives Prefill: write, read, write, done_writing.
        call = self.channel.stream_stream("/test.Echo/Bidi")(timeout=10)
        await call.write(b"1")
        first = await call.read()
        await call.write(b"2")
        await call.done_writing()
        out = [bytes(first)]
        while (msg := await call.read()) is not grpc.aio.EOF:
            out.append(bytes(msg))
        return out

    async def all(self) -> list[object]:
        return [
            await self.unary(),
            await self.server_stream(),
            await self.client_stream(),
            await self.bidi(),
        ]


EXPECTED = [b"x", [b"y"] * 3, b"ab", [b"1", b"2"]]


@contextlib.asynccontextmanager
async def echo_server(security: ClusterSecurity) -> AsyncIterator[str]:
    """The echo service and grpc.health.v1 on a server built as workers build theirs."""
    server = make_server(security, SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_echo_service(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = add_port(server, "127.0.0.1:0", security)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def outcomes(channel: grpc.aio.Channel) -> list[object]:
    """Each call shape's answer, or its status code if it failed."""
    calls = Calls(channel)
    out: list[object] = []
    for call in (calls.unary, calls.server_stream, calls.client_stream, calls.bidi):
        try:
            out.append(await call())
        except grpc.aio.AioRpcError as e:
            out.append(e.code())
    return out


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    req = health_pb2.HealthCheckRequest(service=service)
    return int((await health_pb2_grpc.HealthStub(channel).Check(req, timeout=10)).status)


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_a_port_with_a_secret_refuses_every_call_shape_without_it_but_not_health():
    wrong_same_length = SECRET[:-1] + ("x" if SECRET[-1] != "x" else "y")

    async def scenario() -> None:
        async with echo_server(ClusterSecurity(secret=SECRET)) as address:
            async with secure_channel(address, ClusterSecurity(secret=SECRET)) as ch:
                assert await outcomes(ch) == EXPECTED
            for caller in (ClusterSecurity(), ClusterSecurity(secret=wrong_same_length)):
                async with secure_channel(address, caller) as ch:
                    assert await outcomes(ch) == [UNAUTHENTICATED] * 4
                    # Kubernetes' gRPC probes send no metadata: health stays open.
                    assert await health_status(ch) == SERVING
            # The secret under another key is no secret at all.
            async with grpc.aio.insecure_channel(address) as ch:
                call = ch.unary_unary("/test.Echo/Unary")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(b"x", metadata=(("authorization", f"Bearer {SECRET}"),), timeout=10)
                assert e.value.code() == UNAUTHENTICATED
                assert SECRET_METADATA in (e.value.details() or "")
                assert await call(b"x", metadata=((SECRET_METADATA, SECRET),), timeout=10) == b"x"

    asyncio.run(scenario())


def test_without_a_secret_a_port_is_open_as_before():
    async def scenario() -> None:
        async with echo_server(ClusterSecurity()) as address:
            async with grpc.aio.insecure_channel(address) as ch:
                assert await outcomes(ch) == EXPECTED
            # A caller that has a secret changes nothing on an open port.
            async with secure_channel(address, ClusterSecurity(secret=SECRET)) as ch:
                assert await outcomes(ch) == EXPECTED

    asyncio.run(scenario())


# -- configuration ----------------------------------------------------------------


def _security_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_security_args(p)
    return p.parse_args(argv)


def test_the_secret_comes_from_the_flag_or_the_environment_and_never_shows(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert ClusterSecurity.from_args(_security_args()).is_open
    monkeypatch.setenv(SECRET_ENV, SECRET)
    from_env = ClusterSecurity.from_args(_security_args())
    assert from_env.secret == SECRET and not from_env.is_open
    assert SECRET not in repr(from_env) and SECRET not in from_env.describe()
    other = "another-secret-that-is-long"
    assert ClusterSecurity.from_args(_security_args("--cluster-secret", other)).secret == other
    for bad in ("short", f" {SECRET}", SECRET + "\n", SECRET + "é"):
        with pytest.raises(ValueError, match="cluster secret"):
            ClusterSecurity(secret=bad)


def test_a_launch_uses_the_environments_secret_or_makes_a_fresh_one(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert launch_secret() == SECRET
    monkeypatch.delenv(SECRET_ENV)
    first, second = launch_secret(), launch_secret()
    assert first != second and len(first) >= 32


def test_tls_needs_all_three_files_and_readable_ones(tmp_path, monkeypatch):
    for name in ("SPLITSERVE_TLS_CERT", "SPLITSERVE_TLS_KEY", "SPLITSERVE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="all of"):
        ClusterSecurity.from_args(_security_args("--tls-cert", "a.pem", "--tls-key", "b.pem"))
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="--tls-cert"):
        ClusterSecurity.from_args(
            _security_args("--tls-cert", missing, "--tls-key", missing, "--tls-ca", missing)
        )


def test_the_ray_banner_never_prints_the_api_key():
    from deploy.config import ClusterConfig
    from deploy.ray_cluster import try_command

    pools = {"colocated": {"replicas": 1}}
    key = "the-api-key-nobody-may-see"
    line = try_command(
        ClusterConfig.model_validate({"router": {"api_key": key}, "pools": pools}), "http://h:1"
    )
    assert "Authorization: Bearer" in line and key not in line
    line = try_command(
        ClusterConfig.model_validate({"router": {"api_key_env": "MY_KEY"}, "pools": pools}),
        "http://h:1",
    )
    assert "Bearer $MY_KEY" in line
    open_line = try_command(ClusterConfig.model_validate({"pools": pools}), "http://h:1")
    assert "Authorization" not in open_line


# -- which prefill workers a decode worker may dial ------------------------------


def test_known_peers_ask_their_source_for_strangers_but_not_in_a_flood():
    asked: list[int] = []
    members = ["10.0.0.1:1"]

    async def source() -> list[str]:
        asked.append(1)
        return list(members)

    async def scenario() -> None:
        known = KnownPeers(["127.0.0.1:5"], source, refresh_s=60, min_interval_s=0.2)
        assert known.configured
        assert await known.allows("127.0.0.1:5") and not asked  # fixed: no lookup
        assert await known.allows("10.0.0.1:1") and len(asked) == 1
        # A stranger right after: not asked again within min_interval_s...
        for _ in range(100):
            assert not await known.allows("10.0.0.2:1")
        assert len(asked) == 1
        # ...but a worker that joined is found once the interval has passed.
        members.append("10.0.0.2:1")
        await asyncio.sleep(0.3)
        assert await known.allows("10.0.0.2:1") and len(asked) == 2
        assert not await KnownPeers().allows("127.0.0.1:5")  # nothing configured: nobody

    asyncio.run(scenario())


def test_known_peers_keep_the_last_answer_when_the_source_fails_or_hangs():
    answers: list[object] = [["a:1"], OSError("DNS is down"), "hang"]

    async def source() -> list[str]:
        answer = answers.pop(0) if answers else "hang"
        if isinstance(answer, Exception):
            raise answer
        if answer == "hang":
            await asyncio.sleep(3600)
        assert isinstance(answer, list)
        return answer

    async def scenario() -> None:
        known = KnownPeers(source=source, refresh_s=0, min_interval_s=0, timeout_s=0.2)
        for _ in range(3):  # answered, failed, hung: still known
            assert await known.allows("a:1")
        assert not await known.allows("b:1")

    asyncio.run(scenario())


def test_prefill_flags_name_fixed_addresses_or_a_dns_name():
    from kvtransfer.security import add_known_prefill_args, known_prefill_from_args

    p = argparse.ArgumentParser()
    add_known_prefill_args(p)

    async def scenario() -> None:
        fixed = known_prefill_from_args(p.parse_args(["--prefill-addresses", "1.2.3.4:5, h:6"]))
        assert await fixed.allows("1.2.3.4:5") and await fixed.allows("h:6")
        assert not await fixed.allows("1.2.3.4:6")
        dns = known_prefill_from_args(p.parse_args(["--prefill-dns", "localhost:7"]))
        assert await dns.allows("127.0.0.1:7")  # as router.discovery resolves it
        assert not await dns.allows("127.0.0.1:8")

    asyncio.run(scenario())
    for bad in (["--prefill-addresses", "nope"], ["--prefill-dns", "name-without-port"]):
        with pytest.raises(ValueError, match="NAME:PORT"):
            known_prefill_from_args(p.parse_args(bad))


# -- mutual TLS -------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path  # the cluster's certificate, for 127.0.0.1, signed by `ca`
    key: Path
    rogue_cert: Path  # for 127.0.0.1 too, signed by another CA
    rogue_key: Path

    def security(self, secret: str | None = None) -> ClusterSecurity:
        return ClusterSecurity(
            secret=secret, tls=TlsFiles.load(str(self.cert), str(self.key), str(self.ca))
        )

    def argv(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _ca(name: str) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _leaf(ca_cert: object, ca_key: object, tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN), for servers and clients alike."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert isinstance(ca_cert, x509.Certificate) and isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    tmp = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _ca("splitserve test CA")
    assert isinstance(ca_cert, x509.Certificate)
    (tmp / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = _leaf(ca_cert, ca_key, tmp, "cluster")
    rogue_ca, rogue_ca_key = _ca("someone else's CA")
    rogue_cert, rogue_key = _leaf(rogue_ca, rogue_ca_key, tmp, "rogue")
    return Pki(tmp / "ca.pem", cert, key, rogue_cert, rogue_key)


def test_mtls_lets_in_only_clients_whose_certificate_the_cluster_ca_signed(pki):
    async def scenario() -> None:
        async with echo_server(pki.security()) as address:
            async with secure_channel(address, pki.security()) as ch:
                assert await outcomes(ch) == EXPECTED
            ca = pki.ca.read_bytes()
            refused = {
                "plaintext": grpc.aio.insecure_channel(address),
                "TLS without a client certificate": grpc.aio.secure_channel(
                    address, grpc.ssl_channel_credentials(root_certificates=ca)
                ),
                "a certificate of another CA": grpc.aio.secure_channel(
                    address,
                    grpc.ssl_channel_credentials(
                        root_certificates=ca,
                        private_key=pki.rogue_key.read_bytes(),
                        certificate_chain=pki.rogue_cert.read_bytes(),
                    ),
                ),
            }
            for what, channel in refused.items():
                async with channel:
                    assert await outcomes(channel) == [grpc.StatusCode.UNAVAILABLE] * 4, what

    asyncio.run(scenario())


# -- real worker processes --------------------------------------------------------


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
        i = decode_argv.index("--prefill-addresses")
        assert decode_argv[i + 1] == workers["prefill"]["address"]
    finally:
        assert cluster.stop() == []
    assert cluster.secret not in cluster.log_path.read_text(errors="replace")
