"""Engine options on a command line, shared by every process that hosts an engine."""

from __future__ import annotations

import argparse

from engine.config import DEFAULT_KV_CACHE_MIB, DTYPE_NAMES, EngineConfig, engine_default


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="local Hugging Face model directory (default: built-in model)")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument(
        "--kv-cache-mib", type=int, default=DEFAULT_KV_CACHE_MIB, help="KV cache memory (MiB)"
    )
    g.add_argument(
        "--block-size", type=int, default=engine_default("block_size"), help="tokens per KV block"
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=engine_default("max_num_seqs"),
        help="cap on the running batch",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=engine_default("max_num_batched_tokens"),
        help="token budget of one step",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length")
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt from scratch (by default full KV blocks that a new "
        "prompt shares with an earlier one are reused)",
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the arguments describe; builds the default model if none is named."""
    model = args.model
    if model is None:
        from modelmaker import ensure_default_model

        model = str(ensure_default_model())
    return EngineConfig(
        model=str(model),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
    )
