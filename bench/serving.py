"""The cost of serving: the seed workload over HTTP against the offline engine.

The same requests (the engine benchmark's seed workload: ~128-token prompts,
output lengths drawn from {32, ..., 512}, EOS ignored), four ways:
  (a) offline: the engine in this process, at most C requests running
      (the same concurrency the HTTP runs allow);
  (b) `splitserve serve --colocated 1`, C streaming requests in flight;
  (c) `splitserve serve` (1 prefill + 1 decode), C in flight;
  (d) offline again, beside a process that keeps as much CPU busy as (b)'s
      front end used (router, client and the worker's event loop, read from
      /proc): how much of (b)'s loss is the engine sharing the cores;
for each C of --concurrency (16 and 64 by default);
repeated for --rounds interleaved rounds (the machine is noisy); each figure
is the median over rounds.

Per HTTP run: output tokens/s, and the latency figures as vLLM's `bench
serve` defines them: TTFT (send to first token), TPOT ((e2e - TTFT) /
(output tokens - 1), per request), ITL (gaps between consecutive token
chunks), each p50 and p99.

    python bench/serving.py                      # 128 requests, default model
    python bench/serving.py --num-requests 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine import LLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import Workload

CONCURRENCY = 16


@dataclass
class RequestTiming:
    sent: float
    first: float | None = None
    last: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_offline(llm: LLM, w: Workload) -> float:
    from engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def cluster(model: str, serve_args: list[str], log: Path, kv_cache_mib: int | None):
    """`splitserve serve` on a free port, ready; yields its URL."""
    with cluster_process(model, serve_args, log, kv_cache_mib) as (url, _):
        yield url


@contextlib.contextmanager
def cluster_process(model: str, serve_args: list[str], log: Path, kv_cache_mib: int | None):
    """`splitserve serve` on a free 127.0.0.1 port, every worker healthy;
    yields (URL, its Popen). `kv_cache_mib` None: serve_args say it (or a
    config does). Stopped by its PID (it stops its own workers by theirs)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--model", model, "--port", str(port)]
    if kv_cache_mib is not None:
        cmd += ["--kv-cache-mib", str(kv_cache_mib)]
    cmd += serve_args
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                workers = httpx.get(f"{url}/cluster", timeout=5).json()["workers"]
                if workers and all(w["healthy"] for w in workers):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready in 300 s; see {log}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _cpu_s(stat_path: str) -> float:
    """CPU seconds (user + system) in a /proc stat file; 0 if it is gone."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    return _cpu_s(f"/proc/{pid}/stat")


def _thread_cpu_s(pid: int, tid: int) -> float:
    return _cpu_s(f"/proc/{pid}/task/{tid}/stat")


class FrontEndCpu:
    """CPU the serving front end uses while a run goes on: the router (the
    serve process), this process (the client), and each worker's event-loop
    thread (its main thread; the engine runs on threads of its own).
    Linux only (/proc)."""

    def __init__(self, router_pid: int, worker_pids: list[int]) -> None:
        self.router_pid, self.worker_pids = router_pid, worker_pids
        self._start = self._now()

    def _now(self) -> tuple[float, float]:
        used = _process_cpu_s(self.router_pid) + time.process_time()
        used += sum(_thread_cpu_s(pid, pid) for pid in self.worker_pids)
        return used, time.perf_counter()

    def cores(self) -> float:
        """Mean cores used since construction."""
        used, at = self._now()
        return (used - self._start[0]) / max(1e-9, at - self._start[1])


# Busy `burst` seconds, then idle, so that `cores` of one core are used: the
# front end's CPU in the shape it has (short bursts, one per streamed token).
_CPU_LOAD = """
import sys, time
cores, burst = float(sys.argv[1]), 0.0005
next_at = time.perf_counter()
while True:
    t = time.thread_time()
    while time.thread_time() - t < burst:
        pass
    next_at += burst / cores
    time.sleep(max(0.0, next_at - time.perf_counter()))
"""


@contextlib.contextmanager
def cpu_load(cores: float):
    """A process that keeps `cores` (< 1) of the machine busy in short bursts."""
    proc = subprocess.Popen([sys.executable, "-c", _CPU_LOAD, str(min(cores, 0.95))])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run_http(
    url: str,
    w: Workload,
    cluster_state: bool = True,
    concurrency: int = CONCURRENCY,
    router_pid: int | None = None,
) -> tuple[float, list[RequestTiming], dict]:
    """Send `w` with `concurrency` streams in flight; `cluster_state=False` for a server
    without splitserve's /cluster (vLLM), which then returns {} as the state. With
    `router_pid` (splitserve's serve process), the state's "front_end_cores" is the
    CPU the router, this client and the workers' event loops used during the run."""
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def one_of(w: Workload, i: int, timing: RequestTiming) -> None:
            body = {
                "model": model,
                "prompt": w.prompts[i],
                "max_tokens": w.output_lens[i],
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    timing.error = f"HTTP {r.status_code}"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    now = time.perf_counter()
                    if "error" in event:
                        timing.error = event["error"]["message"]
                    if event.get("usage"):
                        timing.tokens = event["usage"]["completion_tokens"]
                    if any(c.get("text") for c in event.get("choices", [])):
                        if timing.first is None:
                            timing.first = now
                        timing.chunk_times.append(now)
                        timing.last = now

        short = Workload(w.prompts[:2], [8, 8])
        for i in range(2):  # warm up
            await one_of(short, i, RequestTiming(time.perf_counter()))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(w.prompts)):
            queue.put_nowait(i)
        timings = [RequestTiming(0.0) for _ in w.prompts]
        meter = None
        if router_pid is not None:
            workers = (await client.get(f"{url}/cluster")).json()["workers"]
            meter = FrontEndCpu(router_pid, [x["pid"] for x in workers if x.get("pid")])

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                timings[i].sent = time.perf_counter()
                await one_of(w, i, timings[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        front_end = meter.cores() if meter is not None else None
        state = (await client.get(f"{url}/cluster")).json() if cluster_state else {}
        if front_end is not None:
            state["front_end_cores"] = front_end
    return elapsed, timings, state


def summarize(elapsed: float, timings: list[RequestTiming], expected_tokens: int) -> dict:
    errors = [t.error for t in timings if t.error]
    tokens = sum(t.tokens for t in timings)
    ttft = [t.first - t.sent for t in timings if t.first is not None]
    tpot = [
        (t.last - t.first) / (t.tokens - 1)
        for t in timings
        if t.first is not None and t.last is not None and t.tokens > 1
    ]
    itl = [b - a for t in timings for a, b in zip(t.chunk_times, t.chunk_times[1:], strict=False)]
    return {
        "tok_s": tokens / elapsed,
        "complete": tokens == expected_tokens and not errors,
        "errors": errors[:3],
        "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
        "ttft_p99_ms": percentile(ttft, 0.99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 0.5) * 1e3,
        "tpot_p99_ms": percentile(tpot, 0.99) * 1e3,
        "itl_p50_ms": percentile(itl, 0.5) * 1e3,
        "itl_p99_ms": percentile(itl, 0.99) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the built-in default model)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    ap.add_argument(
        "--concurrency", default="16,64", help="requests in flight (and the offline max_num_seqs)"
    )
    ap.add_argument("--kv-cache-mib", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    ap.add_argument(
        "--stream-interval", type=int, default=1, help="decode workers send every N tokens"
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.model is None:
        from modelmaker import ensure_default_model

        args.model = str(ensure_default_model())
    from engine.config import ModelConfig

    vocab = ModelConfig.from_pretrained(args.model).vocab_size
    w = Workload.seeded(args.num_requests, vocab, args.prompt_len, seed=0)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"{args.num_requests} requests, {w.output_tokens} output tokens, {levels} in flight")
    logdir = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--stream-interval", str(args.stream_interval)]
    modes = {"colocated": ["--colocated", "1"], "1P+1D": []}
    llms = {
        c: LLM(args.model, max_num_seqs=c, kv_cache_bytes=args.kv_cache_mib << 20) for c in levels
    }
    for llm in llms.values():
        run_offline(llm, Workload(w.prompts[:2], [8, 8]))  # warm up
    runs_of = [f"{kind}@{c}" for c in levels for kind in ("offline", *modes, "offline+load")]
    rates: dict[str, list[float]] = {r: [] for r in runs_of}
    runs: dict[str, list[dict]] = {r: [] for r in runs_of}
    with contextlib.ExitStack() as stack:
        served = {
            m: stack.enter_context(
                cluster_process(args.model, a + extra, logdir / f"{m}.log", args.kv_cache_mib)
            )
            for m, a in modes.items()
        }
        # Interleaved, so drift on a noisy machine hits every mode alike.
        for round_no in range(args.rounds):
            for c in levels:
                rates[f"offline@{c}"].append(run_offline(llms[c], w))
                for m, (url, proc) in served.items():
                    elapsed, timings, state = asyncio.run(
                        run_http(url, w, concurrency=c, router_pid=proc.pid)
                    )
                    res = summarize(elapsed, timings, w.output_tokens)
                    res["mean_batch"] = max(x["mean_batch_size"] for x in state["workers"])
                    res["front_end_cores"] = state["front_end_cores"]
                    runs[f"{m}@{c}"].append(res)
                    rates[f"{m}@{c}"].append(res["tok_s"])
                # The offline engine again, beside a load as large as the
                # colocated run's front end: what the engine loses to sharing
                # the cores, apart from anything else serving costs.
                with cpu_load(runs[f"colocated@{c}"][-1]["front_end_cores"]):
                    rates[f"offline+load@{c}"].append(run_offline(llms[c], w))
            latest = ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
            print(f"round {round_no + 1} (tok/s): {latest}", flush=True)
    print(
        f"\n{'run':<15}{'tok/s':>7}{'vs offline':>11}{'TTFT p50':>10}{'p99':>8}"
        f"{'TPOT p50':>10}{'p99':>7}{'ITL p50':>9}{'p99':>9}{'front end':>11}"
    )
    results: dict = {"rates": rates, "runs": runs}
    for c in levels:
        offline = statistics.median(rates[f"offline@{c}"])
        print(f"{f'offline@{c}':<15}{offline:>7.0f}{100.0:>10.1f}%")
        for m in modes:
            key = f"{m}@{c}"
            median = statistics.median(rates[key])
            r = min(runs[key], key=lambda x: abs(x["tok_s"] - median))
            results[key] = {**r, "vs_offline": median / offline}
            print(
                f"{key:<15}{median:>7.0f}{median / offline * 100:>10.1f}%"
                f"{r['ttft_p50_ms']:>8.0f}ms{r['ttft_p99_ms']:>6.0f}ms"
                f"{r['tpot_p50_ms']:>8.1f}ms{r['tpot_p99_ms']:>5.1f}ms"
                f"{r['itl_p50_ms']:>7.1f}ms{r['itl_p99_ms']:>7.1f}ms"
                f"{r['front_end_cores']:>6.2f} cores"
            )
            if not all(x["complete"] for x in runs[key]):
                print(f"  INCOMPLETE: {[x['errors'] for x in runs[key]]}")
        loaded = statistics.median(rates[f"offline+load@{c}"])
        colocated = statistics.median(rates[f"colocated@{c}"])
        results[f"offline+load@{c}"] = {"tok_s": loaded, "vs_offline": loaded / offline}
        print(
            f"{f'offline+load@{c}':<15}{loaded:>7.0f}{loaded / offline * 100:>10.1f}%"
            f"   (colocated / this: {colocated / loaded * 100:.1f}%)"
        )
    print(
        "front end: CPU of the router, this client and the workers' event loops during the\n"
        "run, in cores; offline+load: the offline engine beside a process that busies as\n"
        "many cores as the colocated run's front end did, in 0.5 ms bursts"
    )
    print(f"logs: {logdir}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
