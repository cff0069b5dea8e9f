"""Automatic prefix caching, end to end: real `splitserve serve` clusters
with the cache on and off (--no-prefix-caching), and with the router's
cache_aware policy against round_robin over 2 prefill workers.

Configurations (--configs; each a fresh cluster, one torch thread per
worker, the built-in model unless --model):
  1p1d-cache         1 prefill + 1 decode worker
  1p1d-nocache       the same, --no-prefix-caching
  coloc-cache        2 colocated workers
  coloc-nocache      the same, --no-prefix-caching
  2p1d-cache_aware   2 prefill + 1 decode, router policy cache_aware
  2p1d-round_robin   the same, router policy round_robin
  1p1d-local256      1P+1D, --local-prefill-threshold 256: a prompt whose
                     part the decode worker lacks is <= 256 tokens (the next
                     turn of a conversation it holds) is prefilled there
(`splitserve serve` has no policy flag: the 2P+1D pair is started from a
scaling config written to a temporary file, router.policy set; the others
from flags.)

Workloads (--workloads; deploy/loadgen's datasets, 32 output tokens, EOS
ignored):
  prefix     --prefix-count shared prefixes of --prefix-len tokens (4 x 1024),
             each request one of them plus a distinct --suffix-len (64)
             suffix, --num-prompts requests;
  multiturn  --conversations (8) x --turns (4) turns of --turn-len (64) new
             tokens, each resending its conversation's history and sent only
             once the turn before it has finished;
  random     --num-prompts prompts as long as a prefix request's
             (prefix + suffix), sharing nothing: what the cache costs when it
             never hits (lookups, hashing, keeping freed blocks findable).

Per configuration and workload: TTFT p50 and p99, output tok/s, the prefix
cache hit rate (prompt tokens found / looked up, from the workers'
splitserve_prefix_cache_{hits,queries}_total deltas, per pool role; the
table shows the pool that computes prompts: prefill, or colocated), the KV
bytes moved between workers (splitserve_kv_transfer_bytes_total{direction=
"received"} deltas: decode workers), and failed requests.

Load: every request offered at once with at most --max-concurrency (8) in
flight, a closed loop: every configuration carries the same load whatever
its speed (an open-loop rate the no-cache clusters cannot sustain would make
the ratio measure the run's length). --request-rate R gives Poisson arrivals.
Clusters run one at a time, fresh for every (round, configuration), warmed
with one short request per worker; each workload has tokens of its own.
Figures are medians over --rounds; the headline ratios (TTFT p50 no-cache /
cache; hit rate cache_aware / round_robin; tok/s cache / no-cache on
random) are printed against the issue's goals with the CPU's name.

    python bench/prefix_cache.py                 # 7 clusters x 3 workloads x 2 rounds
    python bench/prefix_cache.py --num-prompts 32 --rounds 1     # ~15 minutes
    python bench/prefix_cache.py --configs 2p1d-cache_aware,2p1d-round_robin \
        --workloads prefix --prefix-count 16 --kv-cache-mib 192 --num-prompts 64
    python bench/prefix_cache.py --configs 1p1d-cache,1p1d-nocache --workloads prefix \
        --num-prompts 8 --prefix-len 128 --rounds 1      # a quick check, ~1 minute

On 2 cores (AMD EPYC, float32) a cluster starts in ~12-16 s; the defaults
take ~25-30 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.cpu_info import CpuInfo
from bench.prefix_cache_report import (
    cache_figures,
    fmt,
    format_headline,
    headlines,
    medians,
    prompt_role,
    table,
)
from bench.serving import cluster
from deploy import loadgen
from deploy.cluster_metrics import snapshot
from engine.config import DEFAULT_KV_CACHE_MIB, DTYPE_NAMES
from modelmaker import ensure_default_model

WORKLOADS = ("prefix", "multiturn", "random")


@dataclass(frozen=True)
class Config:
    name: str  # in tables
    flags: tuple[str, ...] = ()  # `splitserve serve` pool flags, or
    policy: str | None = None  # with `policy`: a scaling config, 2 prefill + 1 decode
    prefix_caching: bool = True


CONFIGS: dict[str, Config] = {
    "1p1d-cache": Config("1P+1D cache", ("--prefill", "1", "--decode", "1")),
    "1p1d-nocache": Config("1P+1D no-cache", ("--prefill", "1", "--decode", "1"), None, False),
    "coloc-cache": Config("2 colocated cache", ("--colocated", "2")),
    "coloc-nocache": Config("2 colocated no-cache", ("--colocated", "2"), None, False),
    "2p1d-cache_aware": Config("2P+1D cache_aware", policy="cache_aware"),
    "2p1d-round_robin": Config("2P+1D round_robin", policy="round_robin"),
    "1p1d-local256": Config(
        "1P+1D local <= 256",
        ("--prefill", "1", "--decode", "1", "--local-prefill-threshold", "256"),
    ),
}


def serve_args(cfg: Config, workdir: Path, args: argparse.Namespace) -> list[str]:
    """`splitserve serve` arguments for one configuration (port and model aside);
    a scaling config, when the configuration needs one, is written into `workdir`."""
    common = ["--dtype", args.dtype, "--threads", str(args.threads)]
    if cfg.policy is None:
        out = [*cfg.flags, "--kv-cache-mib", str(args.kv_cache_mib), *common]
        return out if cfg.prefix_caching else [*out, "--no-prefix-caching"]

    def engine() -> dict[str, Any]:  # one per pool (a shared dict would be a YAML alias)
        return {"kv_cache_mib": args.kv_cache_mib, "prefix_caching": cfg.prefix_caching}

    config = {
        "kv_transport": "grpc",
        "router": {"host": "127.0.0.1", "policy": cfg.policy},
        "pools": {
            "prefill": {"replicas": 2, "engine": engine()},
            "decode": {"replicas": 1, "engine": engine()},
        },
    }
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["--config", str(path), *common]


def make_workload(name: str, args: argparse.Namespace) -> list[loadgen.RequestSpec]:
    # A seed of its own per workload: the random workload drawn from the prefix
    # workload's seed would begin with its first prefix, and hit on it.
    seed = args.seed + 1000 * (WORKLOADS.index(name) + 1)
    if name == "prefix":
        return loadgen.make_dataset(
            "prefix",
            args.num_prompts,
            seed=seed,
            output_len=args.output_len,
            prefix_count=args.prefix_count,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
        )
    if name == "multiturn":
        return loadgen.make_dataset(
            "multiturn",
            args.num_prompts,
            seed=seed,
            output_len=args.output_len,
            conversations=args.conversations,
            turns=args.turns,
            turn_len=args.turn_len,
        )
    return loadgen.make_dataset(
        "random",
        args.num_prompts,
        seed=seed,
        input_len=args.prefix_len + args.suffix_len,
        output_len=args.output_len,
    )


def run_one(url: str, specs: list[loadgen.RequestSpec], args: argparse.Namespace) -> dict:
    with httpx.Client(timeout=10) as client:
        before = snapshot(client, url)
        duration, results = asyncio.run(
            loadgen.run_load(
                url,
                specs,
                args.request_rate,
                seed=args.seed,
                max_concurrency=args.max_concurrency or None,
                progress=False,
            )
        )
        after = snapshot(client, url)
    s = loadgen.summarize(duration, results, {}, args.request_rate)
    cache = cache_figures(before, after)
    role = prompt_role(cache["roles"])
    return {
        "duration_s": duration,
        "requests": len(results),
        "failed": s["failed"],
        "errors": s["errors"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "tpot_p50_s": s["tpot_s"]["p50"],
        "output_tok_s": s["output_throughput"],
        "hit_rate": cache["roles"].get(role, {}).get("hit_rate"),
        "hit_rate_role": role,
        "kv_bytes": cache["kv_bytes"],
        "cache": cache,
        "summary": s,
    }


def warm(url: str) -> None:
    """One short request per worker, at once; prompts that share nothing with the workloads."""
    n = len(httpx.get(f"{url}/cluster", timeout=10).json()["workers"])
    specs = loadgen.make_dataset("random", n, seed=987_654, input_len=32, output_len=4)
    _, results = asyncio.run(loadgen.run_load(url, specs, math.inf, progress=False))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


def parse_list(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    for x in out:
        if x not in allowed:
            raise SystemExit(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or str(ensure_default_model())
    ids = parse_list(args.configs, list(CONFIGS), "configuration")
    workloads = parse_list(args.workloads, WORKLOADS, "workload")
    cpu = CpuInfo.read()
    specs = {wl: make_workload(wl, args) for wl in workloads}
    print(f"CPU: {cpu.model_name}; model {model}; dtype {args.dtype}, "
          f"{args.threads} thread(s) per worker", flush=True)  # fmt: skip
    for wl, sp in specs.items():
        lens = [len(s.prompt) for s in sp]
        print(f"   {wl}: {len(sp)} requests, prompts {min(lens)}-{max(lens)} tokens, "
              f"{args.output_len} output tokens", flush=True)  # fmt: skip
    runs: list[dict] = []
    configs_used: dict[str, Any] = {}
    for rnd in range(args.rounds):
        for cid in ids:
            cfg = CONFIGS[cid]
            log = Path(tempfile.gettempdir()) / f"splitserve-prefix-cache-{cid}.log"
            with tempfile.TemporaryDirectory(prefix="splitserve-prefix-cache-") as tmp:
                sargs = serve_args(cfg, Path(tmp), args)
                config_text = (Path(tmp) / "cluster.yaml").read_text() if cfg.policy else None
                configs_used[cid] = {"name": cfg.name, "serve_args": sargs, "config": config_text}
                started = time.monotonic()
                with cluster(model, sargs, log, kv_cache_mib=None) as url:
                    print(f"== round {rnd + 1}/{args.rounds} {cfg.name}: {url} "
                          f"(ready in {time.monotonic() - started:.0f} s, log {log})",
                          flush=True)  # fmt: skip
                    warm(url)
                    for wl in workloads:
                        r = run_one(url, specs[wl], args)
                        r.update(round=rnd, config=cid, workload=wl)
                        runs.append(r)
                        hit = r["hit_rate"]
                        print(
                            f"   {wl}: TTFT p50 {fmt(r['ttft_p50_s'], 1e3)} ms, "
                            f"p99 {fmt(r['ttft_p99_s'], 1e3)} ms, "
                            f"{r['output_tok_s']:.1f} out tok/s, hit rate "
                            f"{'-' if hit is None else f'{hit:.1%}'} ({r['hit_rate_role']}; "
                            + ", ".join(
                                f"{role} {fmt(v['hit_rate'], 100, '.1f')}%"
                                for role, v in r["cache"]["roles"].items()
                            )
                            + f"), KV {r['kv_bytes'] / 2**20:.1f} MiB, "
                            f"failed {r['failed']}/{r['requests']} in {r['duration_s']:.1f} s",
                            flush=True,
                        )
                        for err in r["errors"]:
                            print(f"   error: {err}", flush=True)
    med = medians(runs)
    heads = headlines(med, cpu.model_name)
    return {
        "cpu": cpu.recorded(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "configs": configs_used,
        "workloads": {
            wl: {"requests": len(sp), "prompt_tokens": sum(len(s.prompt) for s in sp)}
            for wl, sp in specs.items()
        },
        "runs": runs,
        "medians": [{"config": c, "workload": w, **m} for (c, w), m in med.items()],
        "headlines": heads,
        "table": table(med, ids, workloads, {c: CONFIGS[c].name for c in ids}),
    }


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"which, in order (default all): {', '.join(CONFIGS)}")  # fmt: skip
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"which, in order (default all): {', '.join(WORKLOADS)}")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=64,
                   help="requests of the prefix and random workloads (default 64)")  # fmt: skip
    p.add_argument("--prefix-count", type=int, default=4, help="shared prefixes (default 4)")
    p.add_argument("--prefix-len", type=int, default=1024,
                   help="tokens per shared prefix (default 1024); the random workload's "
                   "prompts are --prefix-len + --suffix-len tokens")  # fmt: skip
    p.add_argument("--suffix-len", type=int, default=64, help="distinct suffix tokens (64)")
    p.add_argument("--conversations", type=int, default=8, help="multiturn: conversations (8)")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns each (4)")
    p.add_argument("--turn-len", type=int, default=64, help="multiturn: new tokens a turn (64)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="req/s, Poisson (default inf: all at once, --max-concurrency in "
                   "flight)")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="requests in flight at most (default 8; 0: no cap)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds, configurations interleaved; medians (default 2)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    p.add_argument("--dtype", default="float32", choices=["auto", *DTYPE_NAMES],
                   help="passed to `splitserve serve` (default float32)")  # fmt: skip
    p.add_argument("--kv-cache-mib", type=int, default=DEFAULT_KV_CACHE_MIB,
                   help=f"KV cache per worker (default {DEFAULT_KV_CACHE_MIB})")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="of the workloads")
    p.add_argument("--json", metavar="OUT", help="write every run's figures here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.max_concurrency < 0:
        p.error("--max-concurrency must be >= 0")
    try:
        results = run(args)
    except loadgen.BenchError as e:
        raise SystemExit(f"prefix_cache: {e}") from None
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    cpu = results["cpu"]["model_name"]
    print()
    print(f"CPU: {cpu}; medians over {args.rounds} round(s)")
    print()
    print(results["table"])
    print()
    print(f"Headline ratios (CPU: {cpu}):")
    for h in results["headlines"]:
        print(format_headline(h))
    if not results["headlines"]:
        print("- none: each ratio needs both configurations of its pair and its workload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
