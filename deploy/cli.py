"""The `splitserve` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("splitserve")

DEFAULT_STATE_FILE = os.path.join(
    os.environ.get("SPLITSERVE_STATE_DIR", "~/.splitserve"), "up.json"
)
DTYPE_HELP = (
    "auto (default): bfloat16 on a CPU that runs it natively (AMX or AVX512-BF16), "
    "float32 on other CPUs, the checkpoint's dtype on GPU; the choice and why are logged "
    "at startup (and shown on /cluster)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve",
        description="LLM serving with prefill and decode on separate pools.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mk = sub.add_parser(
        "make-model",
        help="write a random-weight Llama-architecture model directory",
        description="Write a Hugging Face model directory with random weights from a fixed "
        "seed and a tokenizer trained offline. 'tiny' is for tests, 'small' (~58M "
        "params) is the default model.",
    )
    mk.add_argument(
        "dir", help="output directory (created if missing; model files in it are replaced)"
    )
    mk.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    mk.add_argument("--arch", choices=["llama", "mistral", "qwen2"], default="llama")
    mk.add_argument("--seed", type=int, default=0)

    sv = sub.add_parser(
        "serve",
        help="start a cluster (router + prefill and decode workers) on this machine",
        description="Start the router (OpenAI-compatible HTTP) and worker processes on "
        "127.0.0.1: --prefill N prefill workers and --decode M decode workers (default 1 and "
        "1), or --colocated K workers that prefill and decode. Without --model it serves the "
        "built-in default model. Ctrl-C stops every process it started.",
    )
    sv.add_argument(
        "--config",
        help="a per-pool scaling config (YAML, see deploy/examples/): pool sizes, engine "
        "limits per pool, the router's address and API key come from it (--host and --port "
        "override its address; pool and engine flags are refused beside it)",
    )
    sv.add_argument("--model", help="local Hugging Face model directory")
    sv.add_argument(
        "--api-key",
        default=os.environ.get("SPLITSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $SPLITSERVE_API_KEY)",
    )
    # Defaults of the flags a config also sets are applied in _serve, so that
    # a flag given beside --config can be told from one left out.
    sv.add_argument("--host", help="router address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="router port (default 8000)")
    sv.add_argument("--prefill", type=int, metavar="N", help="prefill workers (default 1)")
    sv.add_argument("--decode", type=int, metavar="M", help="decode workers (default 1)")
    sv.add_argument(
        "--colocated",
        type=int,
        metavar="K",
        help="run K colocated workers (prefill and decode in one engine) instead",
    )
    sv.add_argument("--served-model-name", help="the model name clients send (default: dir name)")
    sv.add_argument("--kv-cache-mib", type=int, help="KV cache per worker (MiB, default 512)")
    sv.add_argument("--max-num-seqs", type=int, help="running-batch cap (default 64)")
    sv.add_argument(
        "--max-num-batched-tokens", type=int, help="token budget of one step (default 2048)"
    )
    sv.add_argument("--max-model-len", type=int, default=None)
    sv.add_argument("--block-size", type=int, default=16)
    sv.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=DTYPE_HELP,
    )
    sv.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    sv.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="decode workers send tokens every N tokens (the first at once)",
    )
    sv.add_argument(
        "--migration-limit",
        type=int,
        default=None,
        help="times the router may move one request to another decode worker when its "
        "worker fails mid-stream (0: the stream ends with an error event; default 3, or "
        "router.migration_limit in --config)",
    )
    sv.add_argument(
        "--kv-lease",
        type=float,
        default=30.0,
        help="seconds a prefill worker holds a prompt's KV for its decode worker's "
        "acknowledgement before it frees the blocks",
    )
    sv.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="the router's end-to-end limit on one request: 504 past it, the request "
        "cancelled on its worker (default: none; or router.request_timeout_s in --config)",
    )
    sv.add_argument(
        "--kv-reservation-ttl",
        type=float,
        default=120.0,
        help="seconds a decode worker's KV reservation waits for its prefill",
    )
    sv.add_argument(
        "--kv-reservation-wait",
        type=float,
        default=30.0,
        help="seconds a request waits for room in a full decode worker's KV cache before "
        "it is refused (the router then tries another worker, or answers 503)",
    )
    sv.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="requests queued on one decode or colocated worker beyond which new ones are "
        "refused at once with 503 and Retry-After (0: no bound)",
    )
    sv.add_argument(
        "--max-waiting-prompt-tokens",
        type=int,
        default=1 << 18,
        help="queued prompt tokens per worker beyond which new requests are refused at once "
        "(0: no bound)",
    )
    sv.add_argument(
        "--kv-failure-policy",
        choices=("recompute", "fail"),
        default="recompute",
        help="a prefill that fails after the first token: the decode worker recomputes the "
        "prompt and goes on (default), or the request ends with an error",
    )

    upp = sub.add_parser(
        "up",
        help="run the cluster on Ray (an embedded local Ray, or one you name)",
        description="Deploy splitserve as a Ray Serve application from a scaling config: the "
        "router as the HTTP ingress, each pool as its own deployment placed by its resources "
        "and autoscaled on its own signal (prefill on queued prompt tokens, decode on KV-cache "
        "usage or waiting requests), KV between pools through the Ray object store "
        "(kv_transport: ray) or gRPC. Without --address it starts a local Ray on 127.0.0.1 and "
        "stops it on exit. Runs in the foreground and prints every scaling step; Ctrl-C or "
        "`splitserve down` stops it (replicas drain their requests first).",
    )
    upp.add_argument("--config", required=True, help="the scaling config (YAML)")
    upp.add_argument(
        "--address",
        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one",
    )
    upp.add_argument(
        "--num-cpus", type=int, help="CPUs of the embedded local Ray (default: this machine's)"
    )
    upp.add_argument(
        "--state-file",
        default=str(DEFAULT_STATE_FILE),
        help="where `up` records its PID for `down` (default: %(default)s)",
    )
    dn = sub.add_parser(
        "down",
        help="stop what `splitserve up` started",
        description="Stop the running `splitserve up` (its replicas drain first); with "
        "--address and no running `up`, delete the application from that Ray cluster.",
    )
    dn.add_argument("--address", help="the Ray cluster to delete the application from")
    dn.add_argument("--state-file", default=str(DEFAULT_STATE_FILE), help="(default: %(default)s)")

    cc = sub.add_parser(
        "check-config",
        help="validate a per-pool scaling config (YAML) and summarise it",
        description="Load a scaling config (see deploy/examples/) and either print what it "
        "describes or name every bad field and exit 2.",
    )
    cc.add_argument("config", help="path to the YAML file")

    bn = sub.add_parser(
        "bench",
        help="load an OpenAI-compatible endpoint and report TTFT, TPOT, ITL, goodput",
        description="Send a workload to any OpenAI-compatible /v1/completions endpoint "
        "(splitserve's or another server's), streaming, and report what vLLM's `bench serve` "
        "reports. TTFT: send to the first token. TPOT: (E2E - TTFT) / (output tokens - 1), per "
        "request. ITL: the gaps between streamed chunks. E2E: send to the last token. Each as "
        "mean, p50, p90, p99; request and token throughput; goodput: requests per second "
        "meeting every --slo limit. Prompts are token ids (exact lengths on any server); EOS "
        "is ignored so output lengths are as asked.",
        epilog="example: splitserve bench --url http://127.0.0.1:8000 --dataset interference "
        "--num-prompts 200 --request-rate 1,2,4 --slo ttft=1,tpot=100ms --json out.json "
        "--plot-dir plots/",
    )
    bn.add_argument("--url", required=True, help="the server's base URL (http://host:port)")
    bn.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    bn.add_argument(
        "--api-key", default=os.environ.get("SPLITSERVE_API_KEY"), help="Bearer token, if needed"
    )
    bn.add_argument(
        "--dataset",
        choices=["random", "seed", "interference"],
        default="random",
        help="random: --input-len/--output-len each; seed: ~128-token prompts, outputs from "
        "{32,...,512}; interference: short chat turns with --long-fraction of --long-len-token "
        "prompts (default: %(default)s)",
    )
    bn.add_argument("--num-prompts", type=int, default=100, help="requests per rate (default 100)")
    bn.add_argument("--input-len", type=int, default=128, help="random: prompt tokens")
    bn.add_argument("--output-len", type=int, default=128, help="random: output tokens")
    bn.add_argument(
        "--long-fraction", type=float, default=0.1, help="interference: share of long prompts"
    )
    bn.add_argument(
        "--long-len",
        type=int,
        default=1536,
        help="interference: long prompt tokens (default 1536: with its output, it fits the "
        "built-in model's 2048-token context)",
    )
    bn.add_argument(
        "--request-rate",
        default="inf",
        help="requests per second, or inf (all at once); a comma list runs each in turn "
        "(default: %(default)s)",
    )
    bn.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps between arrivals: 1 = Poisson, lower = burstier",
    )
    bn.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    bn.add_argument(
        "--slo",
        help="limits for goodput, e.g. ttft=0.5,tpot=50ms (seconds unless ms; names: ttft, "
        "tpot, itl, e2e)",
    )
    bn.add_argument(
        "--price-per-hour",
        type=float,
        help="what the deployment costs per hour (USD), for tokens per dollar; against a "
        "splitserve router it is read from the cluster's metrics instead",
    )
    bn.add_argument("--seed", type=int, default=0, help="for the dataset and the arrivals")
    bn.add_argument("--json", help="write the summaries and per-request records here")
    bn.add_argument("--plot-dir", help="write PNG plots here (latency CDFs, goodput vs rate)")

    doc = sub.add_parser(
        "doctor",
        help="diagnose a running cluster: batch vs KV room, prefill and decode p95, queues, $",
        description="Read a splitserve router's /cluster and /metrics and every worker's "
        "/metrics twice, --interval apart (or every --interval for --watch seconds, keeping "
        "the busiest window: the peak), and report per pool the running batch (mean over "
        "the window) against what the KV cache could hold, queue depth and queued prompt "
        "tokens, KV pressure, CPU cores busy, prefill and decode p95 side by side, tokens "
        "per dollar, and a diagnosis with a concrete suggestion. Run it while the cluster "
        "is under load.",
    )
    doc.add_argument("--url", required=True, help="the router's base URL (http://host:port)")
    doc.add_argument(
        "--interval", type=float, default=5.0, help="seconds between readings (default 5)"
    )
    doc.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep reading for this long and report on the window with the most output "
        "tokens per second (default: one window)",
    )
    doc.add_argument(
        "--slo",
        metavar="ttft=S,tpot=S",
        help="the latencies promised to users (seconds, or ms): the diagnosis says what to "
        "add when p95 is over them (e.g. tpot=50ms)",
    )
    doc.add_argument("--json", action="store_true", help="print the report as JSON")

    gen = sub.add_parser(
        "generate",
        help="generate offline from one or more prompts",
        description="Run the engine in this process and print each prompt's completion. "
        "Without --model it uses the built-in default model, building it on first use.",
    )
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", help="local Hugging Face model directory")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=DTYPE_HELP,
    )
    gen.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache memory (MiB)")
    gen.add_argument("--max-num-seqs", type=int, default=64)
    gen.add_argument("--max-num-batched-tokens", type=int, default=2048)
    return p


def _make_model(args: argparse.Namespace) -> int:
    from engine.builtin_model import make_model

    t0 = time.monotonic()
    path = make_model(args.dir, preset=args.preset, arch=args.arch, seed=args.seed)
    print(f"wrote {args.preset} {args.arch} model to {path} in {time.monotonic() - t0:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    t0 = time.monotonic()
    outputs = llm.generate(args.prompts, params)
    elapsed = time.monotonic() - t0
    for out in outputs:
        print(f"--- prompt: {out.prompt!r}")
        print(out.text)
        print(
            f"--- {len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
            f"ttft={out.ttft * 1000:.0f} ms"
            if out.ttft is not None
            else ""
        )
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.0f} tok/s)")
    return 0


def _engine_args(
    kv_cache_mib: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int | None
) -> list[str]:
    out = ["--kv-cache-mib", str(kv_cache_mib), "--max-num-seqs", str(max_num_seqs)]
    out += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if max_model_len is not None:
        out += ["--max-model-len", str(max_model_len)]
    return out


def _serve(args: argparse.Namespace) -> int:
    from deploy.launcher import ClusterSpec, LocalCluster

    common = ["--block-size", str(args.block_size), "--dtype", args.dtype]
    common += ["--threads", str(args.threads)]
    decode_extra = ["--kv-reservation-ttl", str(args.kv_reservation_ttl)]
    decode_extra += ["--stream-interval", str(args.stream_interval)]
    decode_extra += ["--kv-reservation-wait", str(args.kv_reservation_wait)]
    decode_extra += ["--max-waiting-requests", str(args.max_waiting_requests)]
    decode_extra += ["--max-waiting-prompt-tokens", str(args.max_waiting_prompt_tokens)]
    decode_extra += ["--kv-failure-policy", args.kv_failure_policy]
    if args.config:
        spec_kwargs = _spec_from_config(args)
    else:
        engine = _engine_args(
            _or(args.kv_cache_mib, 512),
            _or(args.max_num_seqs, 64),
            _or(args.max_num_batched_tokens, 2048),
            args.max_model_len,
        )
        spec_kwargs = dict(
            model=args.model,
            prefill=_or(args.prefill, 1),
            decode=_or(args.decode, 1),
            colocated=_or(args.colocated, 0),
            host=_or(args.host, "127.0.0.1"),
            port=_or(args.port, 8000),
            prefill_args=tuple(engine),
            decode_args=tuple(engine),
            api_key=args.api_key,
            request_timeout_s=args.request_timeout,
        )
    if spec_kwargs["model"] is None:
        from engine.builtin_model import ensure_default_model

        spec_kwargs["model"] = str(ensure_default_model())
    spec_kwargs["decode_args"] = (*spec_kwargs["decode_args"], *decode_extra)
    spec_kwargs["prefill_args"] = (*spec_kwargs["prefill_args"], "--kv-lease", str(args.kv_lease))
    if args.request_timeout is not None and not 0 < args.request_timeout < float("inf"):
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if args.migration_limit is not None and args.migration_limit < 0:
        raise ValueError(f"--migration-limit must be >= 0, got {args.migration_limit}")
    if not args.kv_lease > 0:
        raise ValueError(f"--kv-lease must be > 0 seconds, got {args.kv_lease}")
    spec_kwargs.setdefault("migration_limit", 3)
    if args.migration_limit is not None:
        spec_kwargs["migration_limit"] = args.migration_limit
    spec = ClusterSpec(
        worker_args=tuple(common),
        served_model_name=args.served_model_name,
        **spec_kwargs,
    )
    LocalCluster(spec).serve()
    return 0


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# Flags of `serve` that a config sets per pool: given beside --config, one
# would silently lose to the other.
CONFIG_OWNED_FLAGS = {
    "prefill": "pools.prefill.replicas",
    "decode": "pools.decode.replicas",
    "colocated": "pools.colocated.replicas",
    "kv_cache_mib": "pools.<pool>.engine.kv_cache_mib",
    "max_num_seqs": "pools.<pool>.engine.max_num_seqs",
    "max_num_batched_tokens": "pools.<pool>.engine.max_num_batched_tokens",
    "max_model_len": "pools.<pool>.engine.max_model_len",
}


def _spec_from_config(args: argparse.Namespace) -> dict[str, Any]:
    """ClusterSpec fields from a scaling config (pools, per-pool engine limits,
    router); --host and --port override the router's address."""
    from deploy.config import ConfigError, load_config, pool_engine_args

    for dest, where in CONFIG_OWNED_FLAGS.items():
        if getattr(args, dest) is not None:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} cannot be given with --config: set {where} in the config")
    config = load_config(args.config)
    if config.kv_transport != "grpc":
        raise ConfigError(
            f"{args.config}: kv_transport: {config.kv_transport!r}: `splitserve serve` runs "
            "local processes that move KV over gRPC; set kv_transport: grpc"
        )
    pools = config.pools

    def engine_of(pool: Any) -> tuple[str, ...]:
        # The launcher names the model and the role itself.
        return tuple(pool_engine_args(config, pool, "worker", include_model=False))

    decode_pool = pools.colocated or pools.decode
    return dict(
        model=args.model or config.model_path,
        prefill=pools.prefill.replicas if pools.prefill and not pools.colocated else 0,
        decode=pools.decode.replicas if pools.decode and not pools.colocated else 0,
        colocated=pools.colocated.replicas if pools.colocated else 0,
        host=_or(args.host, config.router.host),
        port=_or(args.port, config.router.port),
        prefill_args=engine_of(pools.prefill) if pools.prefill else (),
        decode_args=engine_of(decode_pool),
        api_key=args.api_key or config.router.resolved_api_key,
        policy=config.router.policy,
        request_timeout_s=_or(args.request_timeout, config.router.request_timeout_s),
        migration_limit=config.router.migration_limit,
    )


def _check_config(args: argparse.Namespace) -> int:
    from deploy.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: valid")
    print(f"  model: {config.model_path or '(built-in)'}; KV transport: {config.kv_transport}")
    print(f"  router: {config.router.host}:{config.router.port}, policy {config.router.policy}")
    for name in ("prefill", "decode", "colocated"):
        pool = getattr(config.pools, name)
        if pool is None:
            continue
        auto = pool.autoscaling
        scaling = f", scales on {auto.signal} (target {auto.target:g})" if auto else ""
        lo = pool.min_replicas if pool.min_replicas is not None else pool.replicas
        hi = pool.max_replicas if pool.max_replicas is not None else pool.replicas
        print(
            f"  {name}: {pool.replicas} replicas ({lo}-{hi}), {pool.resources.num_cpus:g} CPU "
            f"{pool.resources.num_gpus:g} GPU each, KV {pool.engine.kv_cache_mib} MiB{scaling}, "
            f"${pool.price_per_replica_hour:g}/replica-hour"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import math
    from pathlib import Path

    from deploy import loadgen

    slo = loadgen.parse_slo(args.slo)
    rates = loadgen.parse_rates(args.request_rate)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise loadgen.BenchError("--max-concurrency must be at least 1")
    if args.price_per_hour is not None and args.price_per_hour < 0:
        raise loadgen.BenchError("--price-per-hour must be >= 0")
    specs = loadgen.make_dataset(
        args.dataset,
        args.num_prompts,
        seed=args.seed,
        input_len=args.input_len,
        output_len=args.output_len,
        long_fraction=args.long_fraction,
        long_len=args.long_len,
    )
    runs: list[dict[str, Any]] = []
    for rate in rates:
        cost_before = asyncio.run(loadgen.cluster_cost(args.url))
        duration, results = asyncio.run(
            loadgen.run_load(
                args.url,
                specs,
                rate,
                burstiness=args.burstiness,
                seed=args.seed,
                model=args.model,
                api_key=args.api_key,
                max_concurrency=args.max_concurrency,
                progress=sys.stderr.isatty(),
            )
        )
        cost_after = asyncio.run(loadgen.cluster_cost(args.url))
        if args.price_per_hour is not None:
            cost: float | None = args.price_per_hour * duration / 3600
        elif cost_before is not None and cost_after is not None and cost_after > 0:
            cost = cost_after - cost_before  # what a splitserve cluster says it cost
        else:
            cost = None
        summary = loadgen.summarize(duration, results, slo, rate, cost)
        print(loadgen.format_summary(summary), flush=True)
        runs.append(
            {
                "summary": summary,
                "samples": loadgen.samples(results),
                "requests": [loadgen.record(r) for r in results],
            }
        )
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("api_key", "command")}
        # JSON has no infinity: "all at once" is written as the string "inf".
        out = [
            {
                **run,
                "summary": {**run["summary"], "request_rate": str(run["summary"]["request_rate"])},
            }
            if math.isinf(run["summary"]["request_rate"])
            else run
            for run in runs
        ]
        text = json.dumps({"config": config, "runs": out}, indent=1, allow_nan=False)
        Path(args.json).write_text(text)
        print(f"results: {args.json}")
    if args.plot_dir:
        for path in loadgen.plot(runs, Path(args.plot_dir)):
            print(f"plot: {path}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


def _doctor(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from deploy.doctor import examine, format_report
    from deploy.loadgen import parse_slo

    slo = parse_slo(args.slo)
    report = examine(
        args.url, args.interval, watch_s=args.watch, progress=sys.stderr.isatty(), slo=slo
    )
    if args.json:
        report["pools"] = [dataclasses.asdict(p) for p in report["pools"]]
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0


def _up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.config import load_config

    config = load_config(args.config)  # every error before anything starts
    from deploy.ray_cluster import up

    return up(config, args.address, args.num_cpus, Path(args.state_file).expanduser())


def _down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.ray_cluster import down

    return down(Path(args.state_file), args.address)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handlers = {
        "make-model": _make_model,
        "generate": _generate,
        "serve": _serve,
        "check-config": _check_config,
        "bench": _bench,
        "doctor": _doctor,
        "up": _up,
        "down": _down,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"splitserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
