"""The soak: a 1 prefill + 2 decode cluster under a seeded load at about its
saturation rate for --minutes, while a random worker is killed (SIGKILL) or
frozen (SIGSTOP for 3-10 s, then SIGCONT) every 30-60 s, in turn.

Each request ends in exactly one of four ways, judged at the client:
  completed  finish_reason "length" with completion_tokens == max_tokens (EOS
             is ignored, so anything else is a token missing or repeated),
             and a well-formed answer: for a stream, text chunks, one final
             chunk, the usage chunk, then [DONE], nothing unparsable and
             nothing after [DONE]; otherwise a JSON body with the same;
  failed     a clear error: HTTP 4xx/5xx with a JSON error body, or an SSE
             error event followed by [DONE] (503 while every decode worker
             is down or full is one);
  lost       no complete answer: a stream that ends or breaks without a final
             chunk or without [DONE] and with no error event, a 200 without
             JSON, a connection error, or no end within --request-timeout
             (a hang: what the soak hunts);
  malformed  an answer, but a wrong one: a token count off, a 4xx/5xx without
             a JSON error body, an error event without [DONE], data after
             [DONE].
Exit code 1 when a request was lost or malformed, when a live worker is not
idle after the load and a quiet period (KV blocks not all free, or anything
reserved for remote KV, held, running or waiting: a leak), or when a worker
never came back; 2 for bad options or a cluster that did not start.

Also reported: requests migrated to another decode worker mid-stream
(`splitserve_timings.migrations`) and retried on another one before their
first token (`attempts` beyond migrations + 1); prompts recomputed on a
decode worker, scraped from every decode worker's /metrics every 2 s
(`splitserve_kv_failures{outcome="recomputed"}`: the prefill failed after
the first token; and `splitserve_decode_local_prefills`, which counts those
too, plus prompts no prefill worker took at all); worker restarts (/cluster
`restarts_total`); p50 and p99 TTFT and E2E of completed requests. A
restarted worker's counters start again at 0, so the last value read from
each worker process is kept: what a killed worker counted in its last 2 s
is missed.

The load reuses `splitserve bench`'s generator (deploy/loadgen.py): its
datasets and Poisson arrivals. The cluster is bench/serving.py's `splitserve
serve` child process. Kills and freezes go only to the workers of that
cluster (checked: a descendant of this process, running a worker module).

    python bench/soak.py                                  # 10 minutes, the default model
    python bench/soak.py --minutes 1 --chaos-interval 10,20 --json soak.json
    python bench/soak.py --model DIR --rate auto          # measure the saturation rate first
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.serving import cluster  # a `splitserve serve` cluster, ready when it yields
from deploy import loadgen

# Requests per second that keep 1 prefill + 2 decode workers of the default
# model (its default dtype, bfloat16 on CPU; 1 torch thread and 128 MiB of KV
# each) busy with the seed dataset on the 2-core development machine (AMD
# EPYC, AVX2, shared with other work: load average ~4): --rate auto measured
# 0.28 req/s (closed loop, SATURATION_CONCURRENCY in flight; ~37 output tok/s).
DEFAULT_RATE = 0.3
SATURATION_CONCURRENCY = 32
SATURATION_REQUESTS = 48
SCRAPE_INTERVAL_S = 2.0
ACTIONS = ("kill", "freeze")
WORKER_MODULES = ("prefill_worker", "decode_worker")

Kind = Literal["completed", "failed", "lost", "malformed"]
KINDS: tuple[Kind, ...] = ("completed", "failed", "lost", "malformed")


class SoakError(ValueError):
    """Bad options, or a cluster the soak cannot run against: one line for the user."""


@dataclass(frozen=True)
class SoakConfig:
    model: str | None = None  # None: the built-in default model
    minutes: float = 10.0
    rate: float | None = DEFAULT_RATE  # requests/s; None: measure the saturation rate first
    seed: int = 0
    chaos_interval_s: tuple[float, float] = (30.0, 60.0)
    freeze_s: tuple[float, float] = (3.0, 10.0)
    dataset: str = "seed"  # one of loadgen.DATASETS
    input_len: int = 128  # dataset "random" only
    output_len: int = 128  # dataset "random" only
    stream_fraction: float = 0.8  # the rest are non-streaming requests
    request_timeout_s: float = 300.0  # past it, a request counts as lost
    settle_timeout_s: float = 90.0  # after the load: how long workers have to become idle
    kv_cache_mib: int = 128
    threads: int = 1  # torch threads per worker
    serve_args: tuple[str, ...] = ()  # more `splitserve serve` flags
    log_dir: Path | None = None  # None: a new temporary directory
    progress: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.chaos_interval_s
        if not 0 < lo <= hi:
            raise SoakError(f"--chaos-interval needs 0 < MIN <= MAX, got {lo:g},{hi:g}")
        flo, fhi = self.freeze_s
        if not 0 < flo <= fhi:
            raise SoakError(f"--freeze needs 0 < MIN <= MAX, got {flo:g},{fhi:g}")
        if not self.minutes > 0:
            raise SoakError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise SoakError(f"--rate must be a positive number or auto, got {self.rate:g}")
        if not 0 <= self.stream_fraction <= 1:
            raise SoakError(f"--stream-fraction must lie in [0, 1], got {self.stream_fraction:g}")
        if not self.request_timeout_s > 0 or not self.settle_timeout_s > 0:
            raise SoakError("--request-timeout and --settle-timeout must be > 0")

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0


# -- what happened to one request ------------------------------------------------


@dataclass
class Outcome:
    index: int
    stream: bool
    prompt_tokens: int
    max_tokens: int
    sent_s: float  # seconds after the load began
    sent_wall: str  # local time of the send, to find it in the logs
    kind: Kind = "lost"
    reason: str = "not finished"
    request_id: str | None = None
    ttft_s: float | None = None  # streams: send to the first text
    e2e_s: float | None = None  # send to the final chunk (or the whole body)
    completion_tokens: int | None = None
    text_chunks: int = 0
    migrations: int = 0
    attempts: int = 0
    decode_worker: str | None = None


def _completion_problem(choice: dict[str, Any], usage: Any, max_tokens: int) -> str | None:
    """Why a final answer is not a complete one (EOS ignored, no stop: every
    request must end by length with exactly max_tokens tokens)."""
    if choice.get("finish_reason") != "length":
        return f"finish_reason {choice.get('finish_reason')!r}, expected 'length'"
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        return "no usage"
    if usage["completion_tokens"] != max_tokens:
        return f"{usage['completion_tokens']} completion tokens, expected {max_tokens}"
    return None


def _error_message(body: Any) -> str | None:
    """The message of an OpenAI-style error body, or None if it is not one."""
    if not isinstance(body, dict) or "error" not in body:
        return None
    err = body["error"]
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _timings(out: Outcome, event: dict[str, Any]) -> None:
    t = event.get("splitserve_timings")
    if isinstance(t, dict):
        out.migrations = int(t.get("migrations", 0) or 0)
        out.attempts = int(t.get("attempts", 0) or 0)
        out.decode_worker = t.get("decode_worker")


class StreamJudge:
    """Reads one server-sent-event response, line by line, and says how it
    ended (see the module docstring for the rules)."""

    def __init__(self, out: Outcome) -> None:
        self.out = out
        self.done = False  # [DONE] seen
        self.final: dict[str, Any] | None = None  # the chunk with finish_reason
        self.usage: Any = None
        self.error: str | None = None
        self.problem: str | None = None  # the first thing wrong with the stream

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem

    def feed(self, line: str) -> bool:
        """One line of the body; True when it carried text."""
        if not line or line.startswith(":"):  # event separators and SSE comments
            return False
        if self.done:
            self._flag(f"data after [DONE]: {line[:80]!r}")
            return False
        if not line.startswith("data: "):
            self._flag(f"not an SSE data line: {line[:80]!r}")
            return False
        payload = line[6:]
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            event = json.loads(payload)
        except ValueError:
            self._flag(f"unparsable event: {payload[:80]!r}")
            return False
        message = _error_message(event)
        if message is not None:
            self.error = message
            return False
        if not isinstance(event, dict):
            self._flag(f"event is not an object: {payload[:80]!r}")
            return False
        if self.error is not None:
            self._flag("an event after the error event")
        self.out.request_id = self.out.request_id or event.get("id")
        if event.get("usage"):
            self.usage = event["usage"]
        text = False
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = text or bool(choice.get("text") or delta.get("content"))
            if choice.get("finish_reason") is not None:
                if self.final is not None:
                    self._flag("two final chunks")
                self.final = choice
                _timings(self.out, event)
        return text

    def verdict(self, broken: str | None = None) -> tuple[Kind, str]:
        """How the stream ended; `broken`: the connection error that ended it early."""
        if self.error is not None:
            if self.done and self.problem is None:
                return "failed", f"error event: {self.error}"
            why = self.problem or (broken and f"then {broken}") or "no [DONE]"
            return "malformed", f"error event ({self.error}) but {why}"
        if self.problem is not None:
            return "malformed", self.problem
        if self.final is None or not self.done:
            if broken:
                return "lost", broken
            what = "a final chunk" if self.final is None else "[DONE]"
            return "lost", f"stream ended without {what} or an error event"
        problem = _completion_problem(self.final, self.usage, self.out.max_tokens)
        self.out.completion_tokens = (self.usage or {}).get("completion_tokens")
        if problem is not None:
            return "malformed", problem
        return "completed", "ok"


def judge_body(out: Outcome, status: int, body: bytes) -> tuple[Kind, str]:
    """How a non-streaming answer ended."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status >= 400:
        message = _error_message(data)
        if message is None:
            return "malformed", f"HTTP {status} without a JSON error body: {body[:80]!r}"
        return "failed", f"HTTP {status}: {message}"
    if not isinstance(data, dict):
        return "lost", f"HTTP {status} without a JSON body: {body[:80]!r}"
    out.request_id = data.get("id")
    choices = data.get("choices") or []
    if status != 200 or len(choices) != 1:
        return "malformed", f"HTTP {status} with {len(choices)} choices"
    _timings(out, data)
    out.completion_tokens = (data.get("usage") or {}).get("completion_tokens")
    problem = _completion_problem(choices[0], data.get("usage"), out.max_tokens)
    return ("malformed", problem) if problem else ("completed", "ok")


def group_reason(reason: str) -> str:
    """The reason with addresses, ids and numbers (but an HTTP status) blanked,
    so alike ones group."""
    reason = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}:\d+\b", "ADDR", reason)
    reason = re.sub(r"\b(cmpl|chatcmpl)-[0-9a-f]+\b|\b[0-9a-f]{16,}\b", "ID", reason)
    return re.sub(r"(?<!HTTP )\b\d+(\.\d+)?", "N", reason)[:200]  # the status stays


# -- sending --------------------------------------------------------------------


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


# -- chaos ----------------------------------------------------------------------


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
    event = ChaosEvent(round(time.perf_counter() - start, 3), _wall(), step.action)
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


# -- watching the cluster -------------------------------------------------------


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


# -- the run --------------------------------------------------------------------


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


def _wall() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _idle(w: dict[str, Any]) -> bool:
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
            if workers and all(w.get("healthy") and _idle(w) for w in workers):
                return state
        if time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.5)


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
                    _wall(),
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


def build_report(
    config: SoakConfig,
    rate: float,
    measured: float | None,
    load_s: float,
    outcomes: Sequence[Outcome],
    events: Sequence[ChaosEvent],
    watch: Watch,
    end: dict[str, Any],
    router_migrations: dict[str, float],
) -> dict[str, Any]:
    by_kind = {k: [o for o in outcomes if o.kind == k] for k in KINDS}
    done = by_kind["completed"]
    workers = end.get("workers", [])
    leaked = [w for w in workers if w.get("healthy") and not _idle(w)]
    not_back = [w for w in workers if not w.get("healthy")]
    ok = not (by_kind["lost"] or by_kind["malformed"] or leaked or not_back) and bool(workers)
    kept = (
        "role",
        "address",
        "pid",
        "healthy",
        "kv_blocks_total",
        "kv_blocks_free",
        "awaiting_kv",
        "held",
        "running",
        "waiting",
        "restarts",
        "last_error",
    )
    return {
        "ok": ok,
        "config": {**asdict(config), "log_dir": str(config.log_dir)},
        "rate": rate,
        "rate_measured": measured,
        "load_s": round(load_s, 3),
        "sent": len(outcomes),
        "streamed": sum(o.stream for o in outcomes),
        **{k: len(v) for k, v in by_kind.items()},
        "reasons": {
            k: dict(Counter(group_reason(o.reason) for o in by_kind[k]).most_common())
            for k in ("failed", "lost", "malformed")
        },
        # Every request that must not happen, in full, to find in the logs.
        "lost_requests": [asdict(o) for o in by_kind["lost"]][:100],
        "malformed_requests": [asdict(o) for o in by_kind["malformed"]][:100],
        "requests": [asdict(o) for o in outcomes],
        "migrated_requests": sum(o.migrations > 0 for o in outcomes),
        "migrations": sum(o.migrations for o in outcomes),
        # attempts counts every decode worker tried, migrations included
        "retried_requests": sum(o.attempts > 1 + o.migrations for o in outcomes),
        "router_migrations": {
            k.split("{")[1][:-1]: int(v) for k, v in router_migrations.items() if "{" in k
        },
        "recomputed_after_first_token": watch.counter("splitserve_kv_failures{recomputed}"),
        "kv_failures_failed": watch.counter("splitserve_kv_failures{failed}"),
        "local_prefills": watch.counter("splitserve_decode_local_prefills"),
        "migrations_in": watch.counter("splitserve_decode_migrations_in"),
        "restarts_total": end.get("restarts_total"),
        "chaos": [asdict(e) for e in events],
        "kills": sum(e.done and e.action == "kill" for e in events),
        "freezes": sum(e.done and e.action == "freeze" for e in events),
        "output_tokens": sum(o.completion_tokens or 0 for o in done),
        "completed_per_s": len(done) / load_s if load_s > 0 else 0.0,
        "ttft_s": loadgen.latency_stats([o.ttft_s for o in done if o.ttft_s is not None]),
        "e2e_s": loadgen.latency_stats([o.e2e_s for o in done if o.e2e_s is not None]),
        "end_workers": [{k: w.get(k) for k in kept} for w in workers],
        "leaked": [w["address"] for w in leaked],
        "not_back": [w["address"] for w in not_back],
    }


def format_report(r: dict[str, Any]) -> str:
    def ms(st: dict[str, float | None], key: str) -> str:
        v = st[key]
        return f"{v * 1e3:.0f} ms" if v is not None else "-"

    rate = f"{r['rate']:.2f} req/s" + (" (measured)" if r["rate_measured"] else "")
    lines = [
        f"---- soak: {r['load_s']:.0f} s at {rate}, seed {r['config']['seed']} " + "-" * 20,
        f"sent                {r['sent']}  ({r['streamed']} streamed)",
        f"completed in full   {r['completed']}  ({r['completed_per_s']:.2f} req/s, "
        f"{r['output_tokens']} tokens)",
        f"failed (clear)      {r['failed']}",
        f"lost                {r['lost']}",
        f"malformed           {r['malformed']}",
        f"migrated            {r['migrated_requests']} requests ({r['migrations']} moves); "
        f"router: {r['router_migrations'] or '{}'}",
        f"retried before 1st  {r['retried_requests']}",
        f"recomputed          {r['recomputed_after_first_token']} after the first token; "
        f"{r['local_prefills']} prompts prefilled on a decode worker; "
        f"{r['migrations_in']} migrations taken in",
        f"chaos               {r['kills']} kills, {r['freezes']} freezes "
        f"({len(r['chaos'])} attempted)",
        f"worker restarts     {r['restarts_total']}",
        f"TTFT  p50 {ms(r['ttft_s'], 'p50'):>9}   p99 {ms(r['ttft_s'], 'p99'):>9}",
        f"E2E   p50 {ms(r['e2e_s'], 'p50'):>9}   p99 {ms(r['e2e_s'], 'p99'):>9}",
    ]
    for kind in ("failed", "lost", "malformed"):
        for reason, n in r["reasons"][kind].items():
            lines.append(f"  {kind:<9} x{n:<5} {reason}")
    lines.append(
        f"{'worker':<26}{'blocks free':>14}{'awaiting':>9}{'held':>6}"
        f"{'running':>8}{'waiting':>8}{'restarts':>9}"
    )
    for w in r["end_workers"]:
        name = f"{w['role']} {w['address']}" + ("" if w["healthy"] else " DOWN")
        free = f"{w['kv_blocks_free']}/{w['kv_blocks_total']}"
        lines.append(
            f"{name:<26}{free:>14}{w['awaiting_kv']!s:>9}{w['held']!s:>6}"
            f"{w['running']!s:>8}{w['waiting']!s:>8}{w.get('restarts')!s:>9}"
        )
    for e in r["chaos"]:
        what = f"{e['action']} {e['role']} {e['address']} pid {e['pid']}"
        extra = f" for {e['freeze_s']:.1f} s" if e["freeze_s"] else ""
        lines.append(
            f"  chaos at {e['at_s']:6.1f} s ({e['wall']}): {what}{extra}"
            + ("" if e["done"] else f" NOT DONE: {e['note']}")
        )
    problems = [
        f"{r['lost']} lost" if r["lost"] else "",
        f"{r['malformed']} malformed" if r["malformed"] else "",
        f"leaked on {r['leaked']}" if r["leaked"] else "",
        f"not back: {r['not_back']}" if r["not_back"] else "",
    ]
    found = "; ".join(p for p in problems if p) or "no worker answered /cluster"
    verdict = "OK: nothing lost, nothing leaked" if r["ok"] else f"FAILED: {found}"
    for error, n in list(r.get("worker_log_errors", {}).items())[:8]:
        lines.append(f"  worker log ERROR x{n:<4} {error[:110]}")
    if "logs" in r:
        lines.append(f"logs: {r['logs']['serve']}; workers: {' '.join(r['logs']['workers'])}")
    lines.append(verdict)
    return "\n".join(lines)


def worker_logs(serve_log: Path) -> list[str]:
    """The worker log files the launcher named in its own log."""
    try:
        text = serve_log.read_text(errors="replace")
    except OSError:
        return []
    return sorted(set(re.findall(r", log (\S+\.log)", text)))


def log_errors(paths: Sequence[str]) -> dict[str, int]:
    """ERROR lines in the workers' logs, grouped: not a verdict (a killed
    peer is logged as one), but where to look first."""
    found: Counter[str] = Counter()
    for path in paths:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(errors="replace").splitlines():
                m = re.match(r"\d\d:\d\d:\d\d ERROR (\w+)\[\d+\]: (.*)", line)
                if m:
                    found[f"{m[1]}: {group_reason(m[2])}"] += 1
    return dict(found.most_common())


def run(config: SoakConfig) -> dict[str, Any]:
    """Start the cluster, soak it, stop it; the report."""
    model = config.model
    if model is None:
        from engine.builtin_model import ensure_default_model

        model = str(ensure_default_model())
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="splitserve-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    serve_log = log_dir / "serve.log"
    args = ["--prefill", "1", "--decode", "2", "--threads", str(config.threads)]
    args += list(config.serve_args)
    with cluster(model, args, serve_log, config.kv_cache_mib) as url:
        report = asyncio.run(soak(url, config))
    workers = worker_logs(serve_log)
    report["logs"] = {"dir": str(log_dir), "serve": str(serve_log), "workers": workers}
    report["worker_log_errors"] = log_errors(workers)
    report["cpu"] = cpu_model()
    return report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


# -- command line ---------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    return lo, hi


def _rate(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of requests/s or auto, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SoakConfig()
    add = p.add_argument
    add("--model", help="model directory (default: the built-in default model)")
    add("--minutes", type=float, default=d.minutes, help="load time (default 10)")
    add(
        "--rate",
        type=_rate,
        default=d.rate,
        help=f"requests per second, Poisson; 'auto' measures the cluster's saturation first "
        f"(default {DEFAULT_RATE:g}: about saturation for the default model on a 2-core AMD "
        "EPYC, where --rate auto measured 0.28; measure again on another machine or model)",
    )
    add("--seed", type=int, default=d.seed, help="of the requests, their arrivals and the chaos")
    add(
        "--chaos-interval",
        type=_pair,
        default=d.chaos_interval_s,
        metavar="MIN,MAX",
        help="seconds between chaos steps, uniform; kills and freezes in turn (default 30,60)",
    )
    add(
        "--freeze",
        type=_pair,
        default=d.freeze_s,
        metavar="MIN,MAX",
        help="seconds a frozen worker stays stopped, uniform (default 3,10)",
    )
    add("--dataset", choices=loadgen.DATASETS, default=d.dataset, help="(default seed)")
    add("--input-len", type=int, default=d.input_len, help="dataset random: prompt tokens")
    add("--output-len", type=int, default=d.output_len, help="dataset random: output tokens")
    add(
        "--stream-fraction",
        type=float,
        default=d.stream_fraction,
        help="share of streaming requests; the rest wait for a JSON body (default 0.8)",
    )
    add(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        help="seconds; a request with no complete answer by then is lost: a hang (default 300, "
        "some 5x the default model's E2E p99 at saturation here)",
    )
    add(
        "--settle-timeout",
        type=float,
        default=d.settle_timeout_s,
        help="seconds after the load for every worker to be back and idle (default 90, "
        "beyond the prefill KV lease)",
    )
    add("--kv-cache-mib", type=int, default=d.kv_cache_mib, help="KV per worker (default 128)")
    add("--threads", type=int, default=d.threads, help="torch threads per worker (default 1)")
    add("--serve-args", default="", help="more `splitserve serve` flags, as one string")
    add("--log-dir", type=Path, help="where the cluster's logs go (default: a new temp dir)")
    add("--json", type=Path, help="also write the report here, as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        model=args.model,
        minutes=args.minutes,
        rate=args.rate,
        seed=args.seed,
        chaos_interval_s=args.chaos_interval,
        freeze_s=args.freeze,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        stream_fraction=args.stream_fraction,
        request_timeout_s=args.request_timeout,
        settle_timeout_s=args.settle_timeout,
        kv_cache_mib=args.kv_cache_mib,
        threads=args.threads,
        serve_args=tuple(shlex.split(args.serve_args)),
        log_dir=args.log_dir,
        progress=sys.stderr.isatty(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config)
    except (SoakError, loadgen.BenchError, RuntimeError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
