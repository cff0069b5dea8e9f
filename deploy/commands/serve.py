"""`splitserve serve` and `splitserve check-config`: a cluster of local
processes, from flags or a per-pool scaling config."""

from __future__ import annotations

import argparse
import os
from typing import Any

from deploy.commands.common import DTYPE_HELP
from engine.config import DEFAULT_KV_CACHE_MIB, DTYPE_NAMES, engine_default


def add_serve_parser(sub: Any) -> None:
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
    sv.add_argument(
        "--kv-cache-mib",
        type=int,
        help=f"KV cache per worker (MiB, default {DEFAULT_KV_CACHE_MIB})",
    )
    sv.add_argument(
        "--max-num-seqs",
        type=int,
        help=f"running-batch cap (default {engine_default('max_num_seqs')})",
    )
    sv.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help=f"token budget of one step (default {engine_default('max_num_batched_tokens')})",
    )
    sv.add_argument("--max-model-len", type=int, default=None)
    sv.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        default=None,
        help="every worker computes every prompt from scratch (default: full KV blocks a "
        "prompt shares with an earlier one are reused)",
    )
    sv.add_argument("--block-size", type=int, default=16)
    sv.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
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
        "--local-prefill-threshold",
        type=int,
        default=None,
        metavar="TOKENS",
        help="prefill a prompt on its decode worker, with no KV transfer, when the part of it "
        "that worker likely lacks is at most this many tokens (0: always the prefill pool; "
        "default: router.local_prefill_threshold in --config, else the router's default)",
    )
    sv.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json"],
        default=None,
        help="how the router reads tool calls from a chat answer under tool_choice auto "
        "(default: router.tool_call_parser in --config, else hermes, the built-in model's)",
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
    sv.set_defaults(run=_serve)


def add_check_config_parser(sub: Any) -> None:
    cc = sub.add_parser(
        "check-config",
        help="validate a per-pool scaling config (YAML) and summarise it",
        description="Load a scaling config (see deploy/examples/) and either print what it "
        "describes or name every bad field and exit 2.",
    )
    cc.add_argument("config", help="path to the YAML file")
    cc.set_defaults(run=_check_config)


def _engine_args(
    kv_cache_mib: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int | None,
    prefix_caching: bool,
) -> list[str]:
    out = ["--kv-cache-mib", str(kv_cache_mib), "--max-num-seqs", str(max_num_seqs)]
    out += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if max_model_len is not None:
        out += ["--max-model-len", str(max_model_len)]
    if not prefix_caching:
        out.append("--no-prefix-caching")
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
        spec_kwargs = spec_from_config(args)
    else:
        engine = _engine_args(
            _or(args.kv_cache_mib, DEFAULT_KV_CACHE_MIB),
            _or(args.max_num_seqs, engine_default("max_num_seqs")),
            _or(args.max_num_batched_tokens, engine_default("max_num_batched_tokens")),
            args.max_model_len,
            _or(args.prefix_caching, True),
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
        from modelmaker import ensure_default_model

        spec_kwargs["model"] = str(ensure_default_model())
    spec_kwargs["decode_args"] = (*spec_kwargs["decode_args"], *decode_extra)
    spec_kwargs["prefill_args"] = (*spec_kwargs["prefill_args"], "--kv-lease", str(args.kv_lease))
    if args.request_timeout is not None and not 0 < args.request_timeout < float("inf"):
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if args.migration_limit is not None and args.migration_limit < 0:
        raise ValueError(f"--migration-limit must be >= 0, got {args.migration_limit}")
    if not args.kv_lease > 0:
        raise ValueError(f"--kv-lease must be > 0 seconds, got {args.kv_lease}")
    if args.local_prefill_threshold is not None:
        if args.local_prefill_threshold < 0:
            raise ValueError(
                f"--local-prefill-threshold must be >= 0, got {args.local_prefill_threshold}"
            )
        spec_kwargs["local_prefill_threshold"] = args.local_prefill_threshold
    if args.tool_call_parser is not None:
        spec_kwargs["tool_call_parser"] = args.tool_call_parser
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
    "prefix_caching": "pools.<pool>.engine.prefix_caching",
}


def spec_from_config(args: argparse.Namespace) -> dict[str, Any]:
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
        local_prefill_threshold=config.router.local_prefill_threshold,
        tool_call_parser=config.router.tool_call_parser,
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
