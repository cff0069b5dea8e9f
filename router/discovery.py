"""Finding workers whose addresses change: DNS names that resolve to every
worker behind them (a Kubernetes headless Service), asked again at every poll.

    discover = dns_discovery(decode="splitserve-decode:50061", prefill="splitserve-prefill:50051")
    decode_addresses, prefill_addresses = await discover()

A name that does not resolve (yet) gives no workers for that role, not an
error: a pool scaled to zero, or still starting, is a normal state.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from router.pool import Discover


def split_host_port(target: str) -> tuple[str, int]:
    """'name:port' as (name, port); ValueError naming the target otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected NAME:PORT, got {target!r}")
    return host.strip("[]"), int(port)


async def resolve_all(target: str) -> list[str]:
    """Every address `target` ('name:port') resolves to, as 'ip:port', sorted."""
    host, port = split_host_port(target)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    out = set()
    for family, _type, _proto, _name, sockaddr in infos:
        ip = str(sockaddr[0])
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(out)


def dns_discovery(
    decode: str | None = None,
    prefill: str | None = None,
    static_decode: Sequence[str] = (),
    static_prefill: Sequence[str] = (),
) -> Discover:
    """A Discover that resolves the given names at each call, plus any fixed
    addresses."""
    for target in (decode, prefill):
        if target is not None:
            split_host_port(target)  # fail at start, not at the first poll

    async def discover() -> tuple[list[str], list[str]]:
        d = await resolve_all(decode) if decode else []
        p = await resolve_all(prefill) if prefill else []
        return [*static_decode, *d], [*static_prefill, *p]

    return discover
