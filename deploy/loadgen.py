"""`splitserve bench`: load against any OpenAI-compatible completions
endpoint (splitserve's, or another server's), measured the way vLLM's
`bench serve` measures it.

Per request (streaming, usage included):
  TTFT  send to the first chunk with text;
  E2E   send to the last chunk;
  TPOT  (E2E - TTFT) / (output tokens - 1);
  ITL   the gaps between consecutive chunks with text (one per gap).
Per run: mean, p50, p90, p99 of each; requests/s and tokens/s over the run;
goodput: requests per second that met every limit of --slo.

Arrivals: all at once (rate inf), or a Poisson process at --request-rate
(--burstiness 1), burstier below 1 (gamma-distributed gaps, as vLLM).
Datasets: random (given input and output lengths), seed (~128-token prompts,
output lengths drawn from {32, 40, 50, 64, 80, 96, 200, 512}), interference
(mostly short chat turns, some long prompts: 1536 tokens by default).
Prompts are token ids, which OpenAI's completions API accepts, so lengths
are exact on any server.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

SEED_OUTPUT_LENS = (32, 40, 50, 64, 80, 96, 200, 512)
DATASETS = ("random", "seed", "interference")
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
PERCENTILES = (50, 90, 99)


class BenchError(ValueError):
    """Bad options or an endpoint that cannot be benchmarked: one line for the user."""


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int


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


# -- workloads -------------------------------------------------------------------


def make_dataset(
    name: str,
    num_prompts: int,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    long_fraction: float = 0.1,
    long_len: int = 1536,
    token_range: tuple[int, int] = (100, 1000),
) -> list[RequestSpec]:
    """The requests of one run, the same for the same arguments."""
    if num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {num_prompts}")
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if input_len < 1 or output_len < 1 or long_len < 1:
        raise BenchError("input, output and long-prompt lengths must be at least 1")
    if not 0 <= long_fraction <= 1:
        raise BenchError(f"--long-fraction must lie in [0, 1], got {long_fraction}")
    rng = random.Random(seed)
    lo, hi = token_range

    def prompt(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    specs = []
    for _ in range(num_prompts):
        if name == "random":
            specs.append(RequestSpec(prompt(input_len), output_len))
        elif name == "seed":
            n_in = max(1, int(rng.gauss(128, 16)))
            specs.append(RequestSpec(prompt(n_in), rng.choice(SEED_OUTPUT_LENS)))
        elif rng.random() < long_fraction:  # interference: a long document
            specs.append(RequestSpec(prompt(long_len), rng.randint(16, 64)))
        else:  # interference: a short chat turn
            specs.append(RequestSpec(prompt(rng.randint(32, 256)), rng.randint(32, 128)))
    return specs


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times, seconds from the start: all 0 at rate inf; otherwise gaps
    drawn from a gamma distribution with mean 1/rate (shape = burstiness:
    1 is a Poisson process, lower is burstier)."""
    if not rate > 0:
        raise BenchError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise BenchError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=0.5,tpot=0.05' (seconds; a value may end in ms) as a dict."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_METRICS:
            raise BenchError(
                f"bad --slo item {part!r}: expected NAME=SECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)} (e.g. ttft=0.5,tpot=50ms)"
            )
        value = value.strip()
        scale = 1e-3 if value.endswith("ms") else 1.0
        try:
            seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
        except ValueError:
            raise BenchError(f"bad --slo value {value!r} for {key}") from None
        if not seconds > 0:
            raise BenchError(f"--slo {key} must be > 0, got {value}")
        out[key] = seconds
    return out


def parse_rates(text: str) -> list[float]:
    """'inf' or '1,2,4' as request rates (requests per second)."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise BenchError(f"bad --request-rate {part!r}: a number or inf") from None
        if not rate > 0:
            raise BenchError(f"--request-rate must be > 0, got {part}")
        rates.append(rate)
    return rates


# -- running -------------------------------------------------------------------


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
    """Send every request at its arrival time; (duration, results in order)."""
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
            delay = times[i] - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                out = await _one(client, url, model, specs[i], headers, start)
            else:
                async with gate:
                    out = await _one(client, url, model, specs[i], headers, start)
            if bar is not None:
                bar.update(1)
            return out

        try:
            results = await asyncio.gather(*(send(i) for i in range(len(specs))))
        finally:
            if bar is not None:
                bar.close()
        return time.perf_counter() - start, list(results)


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


def check_context(specs: Sequence[RequestSpec], max_model_len: int | None) -> None:
    """Refuse, before the first request, a workload whose requests the server
    would turn away for their length."""
    if not max_model_len:
        return
    over = [s for s in specs if len(s.prompt) + s.max_tokens > max_model_len]
    if over:
        worst = max(over, key=lambda s: len(s.prompt) + s.max_tokens)
        raise BenchError(
            f"{len(over)} of {len(specs)} requests exceed the server's context length "
            f"{max_model_len} (the longest: {len(worst.prompt)} prompt + {worst.max_tokens} "
            "output tokens); lower --input-len, --output-len or --long-len"
        )


def _progress_bar(total: int, rate: float) -> Any:
    from tqdm import tqdm

    label = "all at once" if math.isinf(rate) else f"{rate:g} req/s"
    return tqdm(total=total, desc=f"requests ({label})", unit="req", leave=False)


# -- figures -------------------------------------------------------------------


def latency_stats(xs: list[float]) -> dict[str, float | None]:
    """Mean and PERCENTILES (linear interpolation between samples); None when empty."""
    if not xs:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    xs = sorted(xs)
    out: dict[str, float | None] = {"mean": statistics.fmean(xs)}
    for q in PERCENTILES:
        k = (len(xs) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return out


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    """Did this request meet every limit (ITL: every gap)?"""
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit in slo.items():
        if key == "itl":
            if any(gap > limit for gap in r.itls):
                return False
            continue
        value = values[key]
        if value is not None and value > limit:
            return False
    return True


def summarize(
    duration: float,
    results: Sequence[RequestResult],
    slo: dict[str, float],
    rate: float,
    cost_dollars: float | None = None,
) -> dict[str, Any]:
    """The run's figures (vLLM `bench serve` definitions)."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    good = sum(meets(r, slo) for r in ok)
    summary: dict[str, Any] = {
        "request_rate": rate,
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output / duration if duration > 0 else 0.0,
        "total_token_throughput": (prompt + output) / duration if duration > 0 else 0.0,
        "slo": slo,
        "good_requests": good,
        "goodput": good / duration if duration > 0 else 0.0,
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": latency_stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": latency_stats([gap for r in ok for gap in r.itls]),
        "e2e_s": latency_stats([r.e2e for r in ok if r.e2e is not None]),
    }
    if cost_dollars is not None:
        summary["cost_dollars"] = cost_dollars
        summary["output_tokens_per_dollar"] = output / cost_dollars if cost_dollars > 0 else None
    return summary


def format_summary(s: dict[str, Any]) -> str:
    rate = "inf" if math.isinf(s["request_rate"]) else f"{s['request_rate']:g}"
    lines = [
        f"---- request rate {rate} req/s " + "-" * 30,
        f"completed / failed:         {s['completed']} / {s['failed']}",
        f"duration:                   {s['duration_s']:.2f} s",
        f"request throughput:         {s['request_throughput']:.2f} req/s",
        f"output token throughput:    {s['output_throughput']:.1f} tok/s",
        f"total token throughput:     {s['total_token_throughput']:.1f} tok/s",
    ]
    if s["slo"]:
        limits = ", ".join(f"{k}<={v * 1e3:g}ms" for k, v in s["slo"].items())
        lines.append(
            f"goodput ({limits}): {s['goodput']:.2f} req/s "
            f"({s['good_requests']}/{s['completed']} requests)"
        )
    if "output_tokens_per_dollar" in s:
        tpd = s["output_tokens_per_dollar"]
        shown = f"{tpd:,.0f}" if tpd is not None else "n/a (no price)"
        lines.append(f"output tokens per dollar:   {shown} (${s['cost_dollars']:.4f} spent)")
    lines.append(f"{'':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        st = s[key]
        cells = "".join(
            f"{st[k] * 1e3:>10.1f}" if st[k] is not None else f"{'-':>10}"
            for k in ("mean", "p50", "p90", "p99")
        )
        lines.append(f"{label:<8}{cells}")
    for err in s["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


# -- cost, from a splitserve router -----------------------------------------------


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


# -- plots -----------------------------------------------------------------------


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Latency CDFs (one line per request rate) and, with several rates,
    goodput against request rate. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, label) in zip(
        axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")), strict=True
    ):
        for run in runs:
            xs = sorted(v * 1e3 for v in run["samples"][key])
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=_rate_label(run["summary"]["request_rate"]))
        limit = runs[0]["summary"]["slo"].get(key)
        if limit is not None:
            ax.axvline(limit * 1e3, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    finite = [r for r in runs if not math.isinf(r["summary"]["request_rate"])]
    if len(finite) >= 2:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        rates = [r["summary"]["request_rate"] for r in finite]
        ax.plot(rates, [r["summary"]["goodput"] for r in finite], marker="o", label="goodput")
        ax.plot(
            rates,
            [r["summary"]["request_throughput"] for r in finite],
            marker="x",
            linestyle=":",
            label="throughput",
        )
        ax.plot(rates, rates, color="grey", linewidth=0.8, label="offered")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("req/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "goodput_vs_rate.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _rate_label(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g} req/s"


def samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [r.e2e for r in ok if r.e2e is not None],
    }


def record(r: RequestResult) -> dict[str, Any]:
    out = asdict(r)
    out["tpot"] = r.tpot
    return out
