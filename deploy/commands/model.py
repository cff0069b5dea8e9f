"""`splitserve make-model` and `splitserve generate`: the built-in model
maker and the offline engine, in this process."""

from __future__ import annotations

import argparse
import time
from typing import Any

from deploy.commands.common import DTYPE_HELP
from engine.config import DEFAULT_KV_CACHE_MIB, DTYPE_NAMES, engine_default


def add_make_model_parser(sub: Any) -> None:
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
    mk.set_defaults(run=_make_model)


def add_generate_parser(sub: Any) -> None:
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
        choices=["auto", *DTYPE_NAMES],
        help=DTYPE_HELP,
    )
    gen.add_argument(
        "--kv-cache-mib", type=int, default=DEFAULT_KV_CACHE_MIB, help="KV cache memory (MiB)"
    )
    gen.add_argument("--max-num-seqs", type=int, default=engine_default("max_num_seqs"))
    gen.add_argument(
        "--max-num-batched-tokens", type=int, default=engine_default("max_num_batched_tokens")
    )
    gen.set_defaults(run=_generate)


def _make_model(args: argparse.Namespace) -> int:
    from modelmaker import make_model

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
