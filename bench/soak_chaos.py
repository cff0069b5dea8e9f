"""The soak's faults (bench/soak.py): a seeded plan of kills (SIGKILL) and freezes (SIGSTOP,
then SIGCONT), each struck at a live worker of the cluster this process started, and never at
any other process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ACTIONS = ("kill", "freeze")
WORKER_MODULES = ("prefill_worker", "decode_worker")


def wall_clock() -> str:
    """Local time to the millisecond: when an event happened, to find it in the workers' logs."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


@dataclass(frozen=True)
class ChaosStep:
    at_s: float  # seconds after the load began
    action: str  # "kill" | "freeze"
    pick: float  # in [0, 1): which live worker (by its place in the sorted list)
    freeze_s: float  # how long a freeze lasts (unused by a kill)


def plan_chaos(
    seed: int, duration_s: float, interval_s: tuple[float, float], freeze_s: tuple[float, float]
) -> list[ChaosStep]:
    """The run's chaos, fixed by the seed: a step every `interval_s` (uniform),
    kills and freezes in turn (the seed picks which comes first), so any two
    consecutive steps include one of each."""
    rng = random.Random(seed * 7919 + 17)
    first = rng.randrange(len(ACTIONS))
    steps: list[ChaosStep] = []
    at = rng.uniform(*interval_s)
    while at < duration_s:
        action = ACTIONS[(first + len(steps)) % len(ACTIONS)]
        steps.append(
            ChaosStep(round(at, 3), action, rng.random(), round(rng.uniform(*freeze_s), 3))
        )
        at += rng.uniform(*interval_s)
    return steps


@dataclass
class ChaosEvent:
    at_s: float  # when it was done, seconds after the load began
    wall: str
    action: str
    role: str | None = None
    address: str | None = None
    pid: int | None = None
    freeze_s: float | None = None
    done: bool = False
    note: str = ""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_our_worker(pid: int) -> bool:
    """A worker of the cluster this process started: a descendant of this
    process whose command line runs a worker module (a pid from /cluster
    might have been reused by the time we act on it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not any(m.encode() in cmdline for m in WORKER_MODULES):
        return False
    me, p = os.getpid(), _parent(pid)
    for _ in range(16):  # soak -> serve -> worker; a few more levels at most
        if p is None or p <= 1:
            return False
        if p == me:
            return True
        p = _parent(p)
    return False


def _live_workers(state: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [w for w in state.get("workers", []) if w.get("healthy") and w.get("pid")]
    return sorted(rows, key=lambda w: (w["role"] != "prefill", w["address"]))


async def strike(client: httpx.AsyncClient, url: str, step: ChaosStep, start: float) -> ChaosEvent:
    """Kill or freeze one live worker, as `step` says; a freeze lasts until
    its SIGCONT (sent however this ends)."""
    event = ChaosEvent(round(time.perf_counter() - start, 3), wall_clock(), step.action)
    try:
        live = _live_workers((await client.get(f"{url}/cluster")).json())
    except (httpx.HTTPError, ValueError) as e:
        event.note = f"/cluster did not answer: {type(e).__name__}"
        return event
    if not live:
        event.note = "no live worker"
        return event
    w = live[int(step.pick * len(live))]
    event.role, event.address, event.pid = w["role"], w["address"], int(w["pid"])
    if not is_our_worker(event.pid):
        event.note = "pid is not a worker of this cluster (restarted meanwhile?)"
        return event
    try:
        if step.action == "kill":
            os.kill(event.pid, signal.SIGKILL)
        else:
            event.freeze_s = step.freeze_s
            os.kill(event.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(step.freeze_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(event.pid, signal.SIGCONT)
    except ProcessLookupError:
        event.note = "gone before the signal"
        return event
    event.done = True
    return event


async def run_chaos(
    url: str, steps: Sequence[ChaosStep], start: float, stop: asyncio.Event
) -> list[ChaosEvent]:
    events: list[ChaosEvent] = []
    async with httpx.AsyncClient(timeout=5) as client:
        for step in steps:
            delay = start + step.at_s - time.perf_counter()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, delay))
            if stop.is_set():
                break
            events.append(await strike(client, url, step, start))
    return events
