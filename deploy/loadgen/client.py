"""Driving the load: every request sent at its arrival time (or, if it
follows another, when that one has finished, if later), streamed, and timed
chunk by chunk.

Per request (streaming, usage included):
  TTFT  send to the first chunk with text;
  E2E   send to the last chunk;
  TPOT  (E2E - TTFT) / (output tokens - 1);
  ITL   the gaps between consecutive chunks with text (one per gap).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from deploy.loadgen.workload import BenchError, RequestSpec, arrival_times, check_context

R = TypeVar("R")


@dataclass
class RequestResult:
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0  # seconds since the run began
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        assert self.e2e is not None and self.ttft is not None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def _one(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    spec: RequestSpec,
    headers: dict[str, str],
    start: float,
) -> RequestResult:
    result = RequestResult(prompt_tokens=len(spec.prompt), max_tokens=spec.max_tokens)
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    result.sent = sent - start
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {r.status_code}: {text}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens", 0))
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    chunks += 1
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.itls.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    if last is None:
        result.error = "no text came back"
        return result
    result.e2e = last - sent
    if result.output_tokens == 0:  # a server without usage in the stream
        result.output_tokens = chunks
    return result


async def run_load(
    base_url: str,
    specs: Sequence[RequestSpec],
    rate: float,
    burstiness: float = 1.0,
    seed: int = 0,
    model: str | None = None,
    api_key: str | None = None,
    max_concurrency: int | None = None,
    progress: bool = True,
) -> tuple[float, list[RequestResult]]:
    """Send every request at its arrival time, or after the request it
    follows (RequestSpec.after) has finished if that is later; (duration,
    results in order)."""
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        card = await _model_card(client, base, headers, model)
        model = model or str(card["id"])
        check_context(specs, card.get("max_model_len"))
        url = f"{base}/v1/completions"
        times = arrival_times(len(specs), rate, burstiness, seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = _progress_bar(len(specs), rate) if progress else None
        start = time.perf_counter()

        async def send(i: int) -> RequestResult:
            if gate is None:
                out = await _one(client, url, model, specs[i], headers, start)
            else:
                async with gate:
                    out = await _one(client, url, model, specs[i], headers, start)
            if bar is not None:
                bar.update(1)
            return out

        try:
            results = await dispatch(specs, times, start, send)
        finally:
            if bar is not None:
                bar.close()
        return time.perf_counter() - start, results


async def dispatch(
    specs: Sequence[RequestSpec],
    times: Sequence[float],
    start: float,
    send: Callable[[int], Awaitable[R]],
) -> list[R]:
    """Call send(i) for every request at start + times[i], each that follows
    another only once that one has finished (failed or not: its prompt does
    not depend on the answer); the results in order."""
    for i, spec in enumerate(specs):
        # Only an earlier request may be followed, so no chain can wait on itself.
        if spec.after is not None and not 0 <= spec.after < i:
            raise BenchError(f"request {i} follows request {spec.after}, not an earlier one")
    finished = [asyncio.Event() for _ in specs]

    async def one(i: int) -> R:
        try:
            after = specs[i].after
            if after is not None:
                # Waited for outside any concurrency cap, which the
                # request it waits for may need.
                await finished[after].wait()
            delay = times[i] - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            return await send(i)
        finally:
            finished[i].set()

    return list(await asyncio.gather(*(one(i) for i in range(len(specs)))))


async def _model_card(
    client: httpx.AsyncClient, base: str, headers: dict[str, str], model: str | None
) -> dict[str, Any]:
    """The served model's card from /v1/models (vLLM's and ours carry
    max_model_len). Without `model` it names the model, so it must answer;
    with one, a server without the endpoint is benchmarked all the same."""
    try:
        r = await client.get(f"{base}/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {base}: {type(e).__name__}: {e}") from None
    data = (r.json().get("data") or []) if r.status_code == 200 else []
    if model is not None:
        return next((c for c in data if c.get("id") == model), {"id": model})
    if r.status_code != 200:
        raise BenchError(f"{base}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    if not data:
        raise BenchError(f"{base}/v1/models lists no model; pass --model")
    return dict(data[0])


def _progress_bar(total: int, rate: float) -> Any:
    from tqdm import tqdm

    label = "all at once" if math.isinf(rate) else f"{rate:g} req/s"
    return tqdm(total=total, desc=f"requests ({label})", unit="req", leave=False)


async def cluster_cost(base_url: str) -> float | None:
    """Dollars the cluster's workers have cost so far (the router's
    splitserve_pool_cost_dollars, summed), or None for another server."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"{base_url.rstrip('/')}/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    total, found = 0.0, False
    for line in r.text.splitlines():
        if line.startswith("splitserve_pool_cost_dollars{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None
