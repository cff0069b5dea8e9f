"""Workers let in only the cluster: who may call a worker's gRPC port, and
which peers a worker may dial.

Two ways in, alone or together:

- **A shared secret.** Every call carries it as the metadata entry
  `x-splitserve-cluster-secret`; the worker compares it in constant time
  and answers UNAUTHENTICATED to a call without it or with another value.
  The grpc.health.v1 service stays open: Kubernetes' native gRPC probes
  send no metadata, and health tells a caller nothing it could use.
- **Mutual TLS.** The port speaks TLS only and requires a client
  certificate signed by the cluster's CA; every channel presents one (the
  same cluster certificate serves both ends). Kubernetes' gRPC probes do not
  speak TLS: with mTLS, probe with tcpSocket or exec instead.

Without either, a worker's port is open to whoever reaches it, as before
(`python -m decode_worker` by hand on one machine); it logs a warning at
startup saying so.

The secret comes from $SPLITSERVE_CLUSTER_SECRET, or --cluster-secret (which
`ps` shows every user of the machine: prefer the variable, e.g. from a
Kubernetes Secret). `splitserve serve` and `splitserve up` make a fresh one
per launch unless the variable is set, and hand it to their workers through
the environment, never on a command line.

A decode worker dials only the prefill workers the cluster knows
(KnownPeers): a fixed list (--prefill-addresses), a DNS name resolved again
as the router does (--prefill-dns), or the Ray directory; never an address
merely because a request names it. With none configured it dials nobody and
prefills every prompt itself.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvtransfer.channels import CHANNEL_OPTIONS

log = logging.getLogger("splitserve.security")

SECRET_ENV = "SPLITSERVE_CLUSTER_SECRET"
# The metadata key every call to a worker carries the secret under.
SECRET_METADATA = "x-splitserve-cluster-secret"
# The same files as --tls-cert/--tls-key/--tls-ca (Ray replicas read these).
TLS_ENV = {
    "cert": "SPLITSERVE_TLS_CERT",
    "key": "SPLITSERVE_TLS_KEY",
    "ca": "SPLITSERVE_TLS_CA",
    "server_name": "SPLITSERVE_TLS_SERVER_NAME",
}
# Served to anyone: Kubernetes' gRPC probes carry no metadata.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
MIN_SECRET_CHARS = 16
# A refused call is logged at most this often (a scanner must not flood the log).
REFUSAL_LOG_INTERVAL_S = 10.0


# -- what a process is configured with ------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A cluster certificate (PEM): this process's chain and key, which it
    presents as a server and as a client, and the CA every peer's
    certificate must be signed by."""

    cert: str
    key: str
    ca: str
    # The name the peers' certificates are checked against, when it is not
    # the address dialled (e.g. one DNS name in every worker's certificate,
    # while workers are dialled at their pod IPs).
    server_name: str | None = None
    _pem: tuple[bytes, bytes, bytes] = field(default=(b"", b"", b""), repr=False, compare=False)

    @classmethod
    def load(cls, cert: str, key: str, ca: str, server_name: str | None = None) -> TlsFiles:
        """Read the three files now, so a bad path fails at start."""
        pem = []
        for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
            try:
                pem.append(Path(path).read_bytes())
            except OSError as e:
                raise ValueError(f"{flag} {path}: {e.strerror}") from None
        return cls(cert, key, ca, server_name or None, (pem[0], pem[1], pem[2]))

    def server_credentials(self) -> grpc.ServerCredentials:
        chain, key, ca = self._pem
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        chain, key, ca = self._pem
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=chain
        )


@dataclass(frozen=True)
class ClusterSecurity:
    """How this process proves itself to workers, and how its own gRPC port
    (if any) checks callers. The default, nothing, is an open cluster."""

    secret: str | None = field(default=None, repr=False)  # never in a log line
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        if self.secret is not None:
            check_secret(self.secret)

    @property
    def is_open(self) -> bool:
        """Anyone who reaches the port may use it."""
        return self.secret is None and self.tls is None

    def describe(self) -> str:
        """For a startup log line (names the mechanisms, never the secret)."""
        parts = (["shared secret"] if self.secret else []) + (["mTLS"] if self.tls else [])
        return " + ".join(parts) or "none (open)"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterSecurity:
        """From $SPLITSERVE_CLUSTER_SECRET and $SPLITSERVE_TLS_* (Ray replicas,
        the router ingress)."""
        env = os.environ if environ is None else environ
        return cls(secret=env.get(SECRET_ENV) or None, tls=_tls_from_env(env))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterSecurity:
        """From add_security_args' options; each falls back to its variable."""
        tls = _tls_from(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name, TLS_FLAGS)
        return cls(
            secret=args.cluster_secret or os.environ.get(SECRET_ENV) or None,
            tls=tls or _tls_from_env(os.environ),
        )


TLS_FLAGS = "--tls-cert, --tls-key and --tls-ca"


def _tls_from_env(env: Mapping[str, str]) -> TlsFiles | None:
    cert, key, ca, name = (env.get(TLS_ENV[k]) for k in ("cert", "key", "ca", "server_name"))
    names = "$" + ", $".join(TLS_ENV[k] for k in ("cert", "key", "ca"))
    return _tls_from(cert, key, ca, name, names)


def _tls_from(
    cert: str | None, key: str | None, ca: str | None, server_name: str | None, names: str
) -> TlsFiles | None:
    given = [x for x in (cert, key, ca) if x]
    if not given:
        return None
    if len(given) != 3:
        raise ValueError(f"mTLS needs all of {names}, not some of them")
    assert cert and key and ca
    return TlsFiles.load(cert, key, ca, server_name)


def check_secret(secret: str) -> None:
    """A usable secret: long enough, and printable ASCII (gRPC metadata)."""
    if not (secret.isascii() and secret.isprintable()) or secret != secret.strip():
        raise ValueError(
            f"the cluster secret (${SECRET_ENV}) must be printable ASCII without spaces around it"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"the cluster secret (${SECRET_ENV}) must have at least {MIN_SECRET_CHARS} characters"
        )


def launch_secret() -> str:
    """The secret for a cluster a launcher starts: $SPLITSERVE_CLUSTER_SECRET
    if set (so a test or an operator can reach the workers too), else a
    fresh one for this launch only."""
    secret = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
    check_secret(secret)
    return secret


def add_security_args(p: argparse.ArgumentParser) -> None:
    """--cluster-secret and the mTLS files, for workers and the router."""
    g = p.add_argument_group(
        "cluster security",
        "who may call the workers' gRPC ports (kvtransfer/security.py); without a secret or "
        "mTLS they are open to anyone who reaches them",
    )
    g.add_argument(
        "--cluster-secret",
        metavar="SECRET",
        help=f"the secret every gRPC call between router and workers carries (default: "
        f"${SECRET_ENV}; prefer the variable: a command line is visible to every user of the "
        "machine)",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help=f"mTLS: this process's certificate chain (${TLS_ENV['cert']})",
    )
    g.add_argument("--tls-key", metavar="PEM", help=f"mTLS: its private key (${TLS_ENV['key']})")
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        help=f"mTLS: the CA that signs every peer's certificate (${TLS_ENV['ca']})",
    )
    g.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="mTLS: check the workers' certificates for this name instead of the address "
        f"dialled (${TLS_ENV['server_name']})",
    )


# -- servers ---------------------------------------------------------------------


def make_server(security: ClusterSecurity, options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
    """A grpc.aio server that refuses callers without the secret (if any)."""
    interceptors = [_RequireSecret(security.secret)] if security.secret else None
    return grpc.aio.server(options=list(options), interceptors=interceptors)


def add_port(server: grpc.aio.Server, address: str, security: ClusterSecurity) -> int:
    """Listen on `address` (TLS with client certificates when configured);
    returns the port."""
    if security.tls is not None:
        return int(server.add_secure_port(address, security.tls.server_credentials()))
    return int(server.add_insecure_port(address))


def warn_if_open(security: ClusterSecurity, what: str, address: str) -> None:
    """Say once, at startup, that a port lets anyone in."""
    if security.is_open:
        log.warning(
            "%s on %s is unauthenticated: anyone who reaches it may use it. Set $%s (the same "
            "secret on the router and every worker) or --tls-cert/--tls-key/--tls-ca",
            what,
            address,
            SECRET_ENV,
        )
    else:
        log.info("%s on %s accepts only the cluster (%s)", what, address, security.describe())


class _RequireSecret(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without the secret, before the
    request is even parsed; the health service stays open."""

    def __init__(self, secret: str) -> None:
        self._expected = secret.encode()
        self._last_log = -REFUSAL_LOG_INTERVAL_S
        self._refused_since_log = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        if self._carries_secret(details.invocation_metadata):
            return handler
        self._note_refusal(method)
        return _refusing(handler)

    def _carries_secret(self, metadata: Iterable[Any] | None) -> bool:
        for key, value in metadata or ():
            if key == SECRET_METADATA:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def _note_refusal(self, method: str) -> None:
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d call(s) without the cluster secret (latest: %s)",
                self._refused_since_log,
                method,
            )
            self._last_log, self._refused_since_log = now, 0


_REFUSAL = f"this worker accepts only calls that carry the cluster secret ({SECRET_METADATA})"


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that only refuses (no deserializer: an
    unauthenticated request is never parsed)."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny)
    return grpc.unary_unary_rpc_method_handler(_deny)


# -- channels --------------------------------------------------------------------


def secure_channel(
    address: str,
    security: ClusterSecurity,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.aio.Channel:
    """A channel to a worker: TLS with this process's certificate when
    configured, and the secret on every call when there is one."""
    opts = list(options)
    interceptors = _secret_interceptors(security.secret) if security.secret else None
    if security.tls is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    if security.tls.server_name:
        opts.append(("grpc.ssl_target_name_override", security.tls.server_name))
    return grpc.aio.secure_channel(
        address, security.tls.channel_credentials(), options=opts, interceptors=interceptors
    )


class _AddSecret:
    """Adds the secret to a call's metadata (one instance per call kind:
    grpc.aio files each interceptor under the first kind it matches)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(SECRET_METADATA, self._secret)
        return details._replace(metadata=metadata)

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryUnary(_AddSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _UnaryStream(_AddSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _StreamUnary(_AddSecret, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


class _StreamStream(_AddSecret, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


def _secret_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    return [_UnaryUnary(secret), _UnaryStream(secret), _StreamUnary(secret), _StreamStream(secret)]


# -- which peers a worker may dial -----------------------------------------------
