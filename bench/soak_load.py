"""The soak's load (bench/soak.py): seeded requests at a Poisson rate against the cluster,
each judged as it ends, while the chaos strikes and the workers are watched; then a quiet
period for the cluster to settle."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.soak_chaos import plan_chaos, run_chaos, wall_clock
from bench.soak_config import SoakConfig, SoakError
from bench.soak_report import build_report
from bench.soak_verdicts import Kind, Outcome, StreamJudge, judge_body
from bench.soak_watch import Watch, parse_counters, settle
from deploy import loadgen

SATURATION_CONCURRENCY = 32
SATURATION_REQUESTS = 48
SCRAPE_INTERVAL_S = 2.0


def _body(model: str, spec: loadgen.RequestSpec, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    spec: loadgen.RequestSpec,
    out: Outcome,
    timeout_s: float,
) -> None:
    """Send one request and judge its answer into `out`; never raises."""
    body = _body(model, spec, out.stream)
    sent = time.perf_counter()
    judge = StreamJudge(out)
    try:
        async with asyncio.timeout(timeout_s):
            if out.stream:
                refused = await _stream(client, url, body, judge, sent)
                out.kind, out.reason = refused or judge.verdict()
            else:
                r = await client.post(url, json=body)
                out.kind, out.reason = judge_body(out, r.status_code, r.content)
    except TimeoutError:
        got = f" ({out.text_chunks} text chunks came)" if out.stream else ""
        out.kind, out.reason = "lost", f"no complete answer within {timeout_s:g} s{got}"
        return
    except httpx.HTTPError as e:
        broken = f"{type(e).__name__}: {e}"
        out.kind, out.reason = judge.verdict(broken) if out.stream else ("lost", broken)
        return
    if out.kind in ("completed", "failed"):
        out.e2e_s = time.perf_counter() - sent


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], judge: StreamJudge, sent: float
) -> tuple[Kind, str] | None:
    """Read a stream into `judge`; an answer that is not a stream (an HTTP
    error before it began) is judged as a body and returned."""
    out = judge.out
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return judge_body(out, r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if judge.feed(line):
                out.text_chunks += 1
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - sent
    return None


@dataclass(frozen=True)
class Planned:
    at_s: float
    spec: loadgen.RequestSpec
    stream: bool


def plan_load(config: SoakConfig, rate: float) -> list[Planned]:
    """The run's requests and send times (Poisson at `rate`), fixed by the seed."""
    n = math.ceil(rate * config.duration_s * 1.5) + 16  # enough to fill the window
    specs = loadgen.make_dataset(
        config.dataset, n, config.seed, config.input_len, config.output_len
    )
    times = loadgen.arrival_times(n, rate, 1.0, config.seed)
    rng = random.Random(config.seed + 2)
    return [
        Planned(t, spec, rng.random() < config.stream_fraction)
        for t, spec in zip(times, specs, strict=True)
        if t < config.duration_s
    ]


async def measure_saturation(url: str, config: SoakConfig) -> float:
    """Requests/s the cluster completes with SATURATION_CONCURRENCY in flight
    (a closed loop: a short, quiet measurement before the soak)."""
    specs = loadgen.make_dataset(
        config.dataset, SATURATION_REQUESTS, config.seed + 100, config.input_len, config.output_len
    )
    duration, results = await loadgen.run_load(
        url, specs, math.inf, max_concurrency=SATURATION_CONCURRENCY, progress=config.progress
    )
    summary = loadgen.summarize(duration, results, {}, math.inf)
    if not summary["completed"]:
        raise SoakError(f"no request completed while measuring the rate: {summary['errors']}")
    return float(summary["request_throughput"])


async def _model_card(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    data = (await client.get(f"{url}/v1/models", timeout=10)).json()["data"]
    return dict(data[0])


class _Progress:
    """A tqdm bar over the load window (only on a terminal)."""

    def __init__(self, enabled: bool, total_s: float) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total_s), unit="s", desc="soak", leave=False)

    def update(self, elapsed_s: float, outcomes: Sequence[Outcome], pending: int) -> None:
        if self.bar is None:
            return
        counts = Counter(o.kind for o in outcomes if o.reason != "not finished")
        self.bar.n = min(self.bar.total, round(elapsed_s))
        self.bar.set_postfix(
            sent=len(outcomes),
            ok=counts["completed"],
            failed=counts["failed"],
            lost=counts["lost"],
            in_flight=pending,
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def soak(url: str, config: SoakConfig) -> dict[str, Any]:
    """Load, chaos, quiet period, final state: the report (without logs)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # No read timeout: a stream may pause (a frozen worker); `send` bounds
    # each request as a whole.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10)) as client:
        card = await _model_card(client, url)
        rate, measured = config.rate, None
        if rate is None:
            measured = rate = await measure_saturation(url, config)
            print(f"saturation: {rate:.2f} req/s", flush=True)
        plan = plan_load(config, rate)
        try:
            loadgen.check_context([p.spec for p in plan], card.get("max_model_len"))
        except loadgen.BenchError as e:
            raise SoakError(str(e)) from None
        steps = plan_chaos(config.seed, config.duration_s, config.chaos_interval_s, config.freeze_s)
        watch = Watch(url)
        await watch.poll(client)
        start = time.perf_counter()
        stop = asyncio.Event()
        chaos = asyncio.create_task(run_chaos(url, steps, start, stop))
        outcomes: list[Outcome] = []
        tasks: list[asyncio.Task[None]] = []
        watching = asyncio.create_task(_watch(client, watch, config, start, outcomes, tasks))
        try:
            for i, p in enumerate(plan):
                await asyncio.sleep(max(0.0, start + p.at_s - time.perf_counter()))
                out = Outcome(
                    i,
                    p.stream,
                    len(p.spec.prompt),
                    p.spec.max_tokens,
                    round(time.perf_counter() - start, 3),
                    wall_clock(),
                )
                outcomes.append(out)
                request = send(
                    client,
                    f"{url}/v1/completions",
                    str(card["id"]),
                    p.spec,
                    out,
                    config.request_timeout_s,
                )
                tasks.append(asyncio.create_task(request))
            await asyncio.sleep(max(0.0, start + config.duration_s - time.perf_counter()))
            stop.set()
            events = await chaos  # a freeze in progress ends first
            await asyncio.gather(*tasks)
            load_s = time.perf_counter() - start
        finally:  # however it ends: no frozen worker (chaos thaws it), no task left
            stop.set()
            for t in (watching, chaos, *tasks):
                t.cancel()
            await asyncio.gather(watching, chaos, *tasks, return_exceptions=True)
        end = await settle(client, url, config.settle_timeout_s)
        await watch.poll(client)
        router = (await client.get(f"{url}/metrics", timeout=10)).text
    migrations = parse_counters(router, ["splitserve_router_migrations"])
    return build_report(config, rate, measured, load_s, outcomes, events, watch, end, migrations)


async def _watch(
    client: httpx.AsyncClient,
    watch: Watch,
    config: SoakConfig,
    start: float,
    outcomes: list[Outcome],
    tasks: list[asyncio.Task[None]],
) -> None:
    """Scrape the workers' counters, and show progress, until cancelled."""
    bar = _Progress(config.progress, config.duration_s)
    try:
        while True:
            await watch.poll(client)
            pending = sum(not t.done() for t in tasks)
            bar.update(time.perf_counter() - start, outcomes, pending)
            await asyncio.sleep(SCRAPE_INTERVAL_S)
    finally:
        bar.close()
