"""Workers let in only the cluster (kvtransfer/security.py), in process:

- The shared secret: gRPC servers built by make_server refuse every call
  without it (every call shape), serve grpc.health.v1 to anyone, and
  channels from secure_channel carry it on every call shape.
- Known peers: a decode worker's list of the prefill workers it may dial.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from kvtransfer.channels import SERVER_OPTIONS
from kvtransfer.peers import KnownPeers
from kvtransfer.security import (
    SECRET_ENV,
    SECRET_METADATA,
    ClusterSecurity,
    add_port,
    add_security_args,
    launch_secret,
    make_server,
    secure_channel,
)
from tests.security_kit import SECRET, SERVING, UNAUTHENTICATED, health_status

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
    from kvtransfer.peers import add_known_prefill_args, known_prefill_from_args

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


def test_prefill_addresses_from_a_file_that_appears_later(tmp_path, monkeypatch):
    """How `splitserve serve` starts both pools at once: the decode worker
    is named a file that does not exist yet; once written, the addresses in
    it are known (after the lookup interval, as a DNS name's would be)."""
    from kvtransfer.peers import add_known_prefill_args, known_prefill_from_args

    p = argparse.ArgumentParser()
    add_known_prefill_args(p)
    listing = tmp_path / "prefill-addresses"
    peers = known_prefill_from_args(p.parse_args(["--prefill-addresses-file", str(listing)]))
    assert peers.configured
    peers.min_interval_s = 0.0

    async def scenario() -> None:
        assert not await peers.allows("127.0.0.1:5")  # no file yet: nobody
        listing.write_text("127.0.0.1:5\n127.0.0.1:6\n")
        assert await peers.allows("127.0.0.1:5") and await peers.allows("127.0.0.1:6")
        assert not await peers.allows("127.0.0.1:7")

    asyncio.run(scenario())
    with pytest.raises(SystemExit):  # one source or the other, not both
        p.parse_args(["--prefill-dns", "h:1", "--prefill-addresses-file", str(listing)])


# -- mutual TLS -------------------------------------------------------------------


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
