"""Finding workers whose addresses change: DNS names that resolve to every
worker behind them (a Kubernetes headless Service), asked again at every poll.

    discover = dns_discovery(decode="splitserve-decode:50061", prefill="splitserve-prefill:50051")
    decode_addresses, prefill_addresses = await discover()

A name that does not resolve (yet) gives no workers for that role, not an
error: a pool scaled to zero, or still starting, is a normal state.
"""

from __future__ import annotations

from collections.abc import Sequence

# Shared with the decode workers, which resolve the prefill pool's name the
# same way to know which prefill workers they may dial.
from kvtransfer.peers import resolve_all, split_host_port
from router.pool import Discover

__all__ = ["dns_discovery", "resolve_all", "split_host_port"]


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
