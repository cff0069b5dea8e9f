"""Which prefill workers a decode worker may dial: fixed addresses, a DNS name
resolved again every few seconds, or a file the launcher writes; and the
host:port parsing they share with the router's discovery."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger("splitserve.security")


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


# Where the members of a pool are now (a DNS name, the Ray directory).
PeerSource = Callable[[], Awaitable[Sequence[str]]]


class KnownPeers:
    """The peers (prefill workers) a decode worker may dial: fixed
    addresses, plus what `source` names. The source is asked again when its
    last answer is older than `refresh_s`, or when a request names an
    address not in it (a worker that just joined), but at most every
    `min_interval_s`: requests naming strangers never become a flood of
    lookups. A source that fails or is slow keeps the last answer.

    Addresses match as strings: give the decode workers the same addresses
    (or DNS name) as the router."""

    def __init__(
        self,
        static: Iterable[str] = (),
        source: PeerSource | None = None,
        *,
        refresh_s: float = 5.0,
        min_interval_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.static = frozenset(a.strip() for a in static if a.strip())
        self.source = source
        self.refresh_s = refresh_s
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self._found: frozenset[str] = frozenset()
        self._found_at = -float("inf")  # monotonic time of the last answer
        self._asked_at = -float("inf")  # ... and of the last attempt
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        """Whether any peer can be known at all (else every address is refused)."""
        return bool(self.static) or self.source is not None

    async def allows(self, address: str) -> bool:
        if address in self.static:
            return True
        if self.source is None:
            return False
        now = time.monotonic()
        stale = now - self._found_at >= self.refresh_s
        if (stale or address not in self._found) and now - self._asked_at >= self.min_interval_s:
            await self._refresh()
        return address in self._found

    async def _refresh(self) -> None:
        assert self.source is not None
        async with self._lock:  # concurrent requests share one lookup
            if time.monotonic() - self._asked_at < self.min_interval_s:
                return  # another request just asked
            self._asked_at = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_s):
                    found = await self.source()
            except Exception as e:  # keep the last answer
                log.warning("could not list the known prefill workers: %s: %s", type(e).__name__, e)
                return
            self._found = frozenset(found)
            self._found_at = time.monotonic()


def add_known_prefill_args(p: argparse.ArgumentParser) -> None:
    """How a decode worker knows the prefill workers it may dial."""
    p.add_argument(
        "--prefill-addresses",
        metavar="HOST:PORT,...",
        help="the prefill workers this decode worker may dial (the router names, per request, "
        "which to ask; any other address is skipped, logged and counted in "
        "splitserve_decode_prefill_unknown_total). With neither this nor --prefill-dns, no "
        "prefill worker is dialled and every prompt is prefilled here",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--prefill-dns",
        metavar="NAME:PORT",
        help="a DNS name that resolves to every prefill worker (the router's --prefill-dns), "
        "resolved again every few seconds and whenever a request names a new address",
    )
    where.add_argument(
        "--prefill-addresses-file",
        metavar="PATH",
        help="a file naming the prefill workers (HOST:PORT, one per line), read again as "
        "--prefill-dns is resolved; a missing file names none yet. `splitserve serve` writes "
        "it once its prefill workers are up, so that both pools start at the same time",
    )


def known_prefill_from_args(args: argparse.Namespace) -> KnownPeers:
    static = parse_addresses(args.prefill_addresses or "")
    target = args.prefill_dns
    if target:
        split_host_port(target)  # fail at start, not at the first request
        return KnownPeers(static, lambda: resolve_all(target))
    listing = getattr(args, "prefill_addresses_file", None)
    if listing:
        return KnownPeers(static, lambda: read_address_file(Path(listing)))
    return KnownPeers(static)


async def read_address_file(path: Path) -> list[str]:
    """The addresses a file names (one per line or comma-separated); none
    while it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return parse_addresses(",".join(text.split()))


def write_address_file(path: Path, addresses: Iterable[str]) -> None:
    """The file read_address_file reads, one address per line. Written
    atomically: a decode worker reading it meanwhile sees the old file or
    the whole new one, never half an address."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(addresses) + "\n")
    tmp.replace(path)


def parse_addresses(text: str) -> list[str]:
    """'a:1,b:2' as ['a:1', 'b:2'], each checked."""
    out = [a.strip() for a in text.split(",") if a.strip()]
    for address in out:
        split_host_port(address)
    return out
