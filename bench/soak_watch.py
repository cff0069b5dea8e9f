"""What the soak (bench/soak.py) sees of the cluster: /cluster, the decode workers' counters,
and whether every worker is back and idle once the load stops."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def parse_counters(text: str, names: Sequence[str]) -> dict[str, float]:
    """Sum of each counter in `names` (and per value of its `outcome` label,
    as NAME{outcome}) in a Prometheus text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "counter":
            continue
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name == sample.name or name not in names:
                continue  # _created, or another counter
            keys = [name]
            if "outcome" in sample.labels:
                keys.append(f"{name}{{{sample.labels['outcome']}}}")
            for key in keys:
                out[key] = out.get(key, 0.0) + sample.value
    return out


WORKER_COUNTERS = (
    "splitserve_kv_failures",
    "splitserve_decode_local_prefills",
    "splitserve_decode_migrations_in",
)


@dataclass
class Watch:
    """The cluster as the soak saw it: /cluster, and decode workers' counters
    per worker process (a restarted worker counts from 0 again, so the last
    value read from each (address, pid) is kept and summed)."""

    url: str
    per_process: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    async def poll(self, client: httpx.AsyncClient) -> None:
        try:
            self.state = (await client.get(f"{self.url}/cluster", timeout=10)).json()
        except (httpx.HTTPError, ValueError):
            return
        for w in self.state.get("workers", []):
            if w.get("role") != "decode" or not (w.get("healthy") and w.get("metrics_port")):
                continue
            try:
                r = await client.get(f"http://127.0.0.1:{w['metrics_port']}/metrics", timeout=2)
                values = parse_counters(r.text, WORKER_COUNTERS)
            except (httpx.HTTPError, ValueError):
                continue  # frozen, or just killed
            self.per_process[(w["address"], int(w["pid"]))] = values

    def counter(self, key: str) -> int:
        return int(sum(v.get(key, 0.0) for v in self.per_process.values()))


def is_idle(w: dict[str, Any]) -> bool:
    """Nothing left on a worker: every KV block free, nothing reserved, held, running or waiting."""
    return bool(
        w.get("kv_blocks_free") == w.get("kv_blocks_total")
        and not w.get("awaiting_kv")
        and not w.get("held")
        and not w.get("running")
        and not w.get("waiting")
    )


async def settle(client: httpx.AsyncClient, url: str, timeout_s: float) -> dict[str, Any]:
    """Wait, with no load, until every worker is back and idle or `timeout_s`
    passed; the last /cluster answer."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            state = (await client.get(f"{url}/cluster", timeout=10)).json()
            workers = state.get("workers", [])
            if workers and all(w.get("healthy") and is_idle(w) for w in workers):
                return state
        if time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.5)
