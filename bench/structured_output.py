"""What structured output costs the offline engine: throughput with and without a JSON schema.

For each batch size (requests in flight = max_num_seqs; default 1, 16 and 64), one engine
runs the same requests in two arms, interleaved over --rounds (plain, schema, plain,
schema, ...) so that drift on a shared machine falls on both:

  plain    ignore_eos=True: every request generates exactly --max-tokens tokens
  schema   SamplingParams(structured_output=GuidedSpec.json_schema(SCHEMA)): the output ends
           when the grammar completes (finish "stop"); --max-tokens (160) is above the
           documents seen here (~95-130 tokens), and one cut short ("length") counts invalid

Both arms: the same prompts (max(4, --waves x batch) of them, ~25 tokens each), the same
max_tokens and temperature (greedy by default), prefix caching off so every run pays the same
prefills. Reported per batch, medians over the rounds: output tok/s (tokens generated /
wall), the mean output length, ms per engine step (wall / steps) and where a step goes (the
runner's prepare / forward / sample times; sample includes the grammar), and the grammar's
own share, timed by wrappers this bench installs around engine.structured_output's
apply_token_masks (the batch's mask: xgrammar's fill + the apply on the logits) and
GrammarMatcher.accept (advancing each matcher by its sampled token); the ratios schema /
plain. Every schema output is checked with json.loads and jsonschema; failures are counted.
Beside them, from this process's CPU time: output tokens per CPU-second and CPU ms per step,
which, with --threads 1, leave out what other work on a shared machine takes from the wall
time (with more threads, a thread that waits for another's core may spin and count).

A schema output ends with its document, so the schema arm's batch drains as its requests
finish while the plain arm's stays full (the mean running batch of each is shown), and its
sequences are shorter: tok/s compares the two workloads as a client would see them, the
grammar share (mask + accept time / step time) is what the grammar itself adds to a step.

    python bench/structured_output.py                   # default model: 3.5 minutes, 2 idle cores
    python bench/structured_output.py --threads 1       # steadier when shared (6.4 min, loaded)
    python bench/structured_output.py --batches 16 64 --rounds 3 --json /tmp/so.json
    python bench/structured_output.py --quick           # the tiny test model, ~15 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.cpu_info import CpuInfo
from engine import LLM, SamplingParams
from engine import structured_output as so
from engine.sampling_params import GuidedSpec

# What an extraction endpoint asks for: every property required (OpenAI's strict mode),
# an enum, a boolean, bounded integers, a nested object, an array with maxItems and a
# short string with maxLength. Its documents are ~95-130 tokens with the default model's
# tokenizer (the keys and punctuation, one token per step, are most of them), ~110-120 with
# the tiny test model's.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "degraded", "down", "maintenance"]},
        "healthy": {"type": "boolean"},
        "replicas": {"type": "integer", "minimum": 1, "maximum": 64},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9},
        "owner": {
            "type": "object",
            "properties": {
                "team": {"enum": ["infra", "ml", "serving", "storage"]},
                "oncall": {"type": "boolean"},
            },
            "required": ["team", "oncall"],
            "additionalProperties": False,
        },
        "zones": {
            "type": "array",
            "items": {"enum": ["us-east", "us-west", "eu", "ap"]},
            "maxItems": 3,
        },
        "summary": {"type": "string", "maxLength": 16},
    },
    "required": ["status", "healthy", "replicas", "priority", "owner", "zones", "summary"],
    "additionalProperties": False,
}

ARMS = ("plain", "schema")
SERVICES = ("checkout", "search", "billing", "auth", "inventory", "ledger", "gateway", "mailer")
REGIONS = ("us-east", "us-west", "eu", "ap")


def make_prompts(n: int) -> list[str]:
    """n distinct prompts of ~25 tokens (the default model's tokenizer)."""
    return [
        f"Service {SERVICES[i % len(SERVICES)]}-{i} in {REGIONS[i % len(REGIONS)]}: report its "
        f"status, replicas, priority, owner and zones as JSON."
        for i in range(n)
    ]


class GrammarTimer:
    """Times engine.structured_output.apply_token_masks and GrammarMatcher.accept while
    installed: the model runner calls both through the module and the class, so wrapping
    them there times the engine's own calls without touching its code."""

    def __init__(self) -> None:
        self.mask_s = 0.0
        self.mask_calls = 0
        self.mask_rows = 0
        self.accept_s = 0.0
        self.accepts = 0

    def snapshot(self) -> dict[str, float]:
        return dict(vars(self))

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {k: v - before[k] for k, v in vars(self).items()}

    @contextlib.contextmanager
    def installed(self) -> Iterator[GrammarTimer]:
        apply_masks = so.apply_token_masks
        accept = so.GrammarMatcher.accept

        def timed_apply(logits: torch.Tensor, rows: Any, matchers: Any) -> None:
            t0 = time.perf_counter()
            try:
                apply_masks(logits, rows, matchers)
            finally:
                self.mask_s += time.perf_counter() - t0
                self.mask_calls += 1
                self.mask_rows += len(rows)

        def timed_accept(matcher: so.GrammarMatcher, token_id: int) -> bool:
            t0 = time.perf_counter()
            try:
                return accept(matcher, token_id)
            finally:
                self.accept_s += time.perf_counter() - t0
                self.accepts += 1

        so.apply_token_masks = timed_apply
        so.GrammarMatcher.accept = timed_accept  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            so.apply_token_masks = apply_masks
            so.GrammarMatcher.accept = accept  # type: ignore[method-assign]


def invalid_outputs(outs: list[Any], schema: dict[str, Any]) -> list[str]:
    """Why each schema output that is not a valid document fails (cut short, not JSON,
    or not of the schema); empty when all are valid."""
    import jsonschema

    bad = []
    for o in outs:
        if o.finish_reason != "stop":
            bad.append(f"finish {o.finish_reason!r} after {len(o.token_ids)} tokens: {o.text!r}")
            continue
        try:
            jsonschema.validate(json.loads(o.text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            bad.append(f"{type(e).__name__}: {str(e).splitlines()[0]}: {o.text!r}")
    return bad


def run_arm(
    llm: LLM,
    prompts: list[str],
    params: list[SamplingParams],
    timer: GrammarTimer,
) -> tuple[dict[str, float], list[Any]]:
    eng = llm.engine
    stats, timings = eng.scheduler.stats, eng.runner.timings
    steps0, running0 = stats.num_steps, stats.running_batch_sum
    before, grammar0 = copy.copy(timings), timer.snapshot()
    t0, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    steps = max(stats.num_steps - steps0, 1)
    grammar = timer.since(grammar0)
    tokens = sum(len(o.token_ids) for o in outs)
    per_step = 1e3 / steps
    r = {
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "mean_output_tokens": tokens / len(outs),
        "max_output_tokens": max(len(o.token_ids) for o in outs),
        "steps": steps,
        "mean_running_batch": (stats.running_batch_sum - running0) / steps,
        "step_ms": wall * per_step,
        # This process's CPU time: with one torch thread, what other work on the machine
        # takes from the wall time is left out.
        "cpu_step_ms": cpu * per_step,
        "prepare_ms": (timings.prepare_s - before.prepare_s) * per_step,
        "forward_ms": (timings.forward_s - before.forward_s) * per_step,
        "sample_ms": (timings.sample_s - before.sample_s) * per_step,
        "mask_ms": grammar["mask_s"] * per_step,
        "accept_ms": grammar["accept_s"] * per_step,
        "mask_rows_per_call": grammar["mask_rows"] / max(grammar["mask_calls"], 1),
    }
    # The scheduler, the detokenizer, stop checks and the rest of the step loop.
    r["rest_ms"] = r["step_ms"] - r["prepare_ms"] - r["forward_ms"] - r["sample_ms"]
    r["output_tok_per_cpu_s"] = tokens / cpu
    # What the grammar itself adds to a step: the mask and the accepts.
    r["grammar_share"] = (r["mask_ms"] + r["accept_ms"]) / r["step_ms"]
    return r, outs


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_batch(
    model_dir: str, batch: int, args: argparse.Namespace, timer: GrammarTimer
) -> dict[str, Any]:
    n = max(4, args.waves * batch)
    prompts = make_prompts(n)
    spec = GuidedSpec.json_schema(SCHEMA)
    common = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    # Seeded per request when sampling, so every round repeats the same outputs.
    seeds = list(range(n)) if args.temperature > 0 else [None] * n
    params = {
        "plain": [SamplingParams(ignore_eos=True, seed=s, **common) for s in seeds],
        "schema": [SamplingParams(structured_output=spec, seed=s, **common) for s in seeds],
    }
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        max_num_seqs=batch,
        enable_prefix_caching=False,
    )
    # The tokenizer's tables and the schema, compiled once per engine (then cached).
    t0 = time.perf_counter()
    llm.engine.compile_grammar(spec).result()
    compile_s = time.perf_counter() - t0
    dtype_name = str(llm.engine.runner.dtype).removeprefix("torch.")
    print(f"batch {batch}: {n} requests, dtype {dtype_name}, grammar compiled in "
          f"{compile_s * 1e3:.0f} ms (the tokenizer's tables included)", flush=True)  # fmt: skip
    # Warm up both arms (allocator, kernels, the first masks) on a few requests.
    warm = prompts[: min(n, 4)]
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.generate(warm, SamplingParams(structured_output=spec, **common), use_tqdm=False)

    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    invalid: list[str] = []
    for rnd in range(args.rounds):
        for arm in ARMS:
            r, outs = run_arm(llm, prompts, params[arm], timer)
            if arm == "schema":
                bad = invalid_outputs(outs, SCHEMA)
                r["invalid"] = len(bad)
                invalid += bad
            runs[arm].append(r)
            print(
                f"  batch {batch:>3} round {rnd + 1}/{args.rounds} {arm:<6} "
                f"{r['output_tok_s']:7.1f} tok/s  {r['wall_s']:6.1f} s  "
                f"{r['step_ms']:6.1f} ms/step (forward {r['forward_ms']:.1f}, sample "
                f"{r['sample_ms']:.1f}, mask {r['mask_ms']:.2f}, accept {r['accept_ms']:.2f}), "
                f"mean output {r['mean_output_tokens']:.1f} tokens, running batch "
                f"{r['mean_running_batch']:.1f}"
                + (f", invalid {r['invalid']}/{n}" if arm == "schema" else ""),
                flush=True,
            )
    for why in invalid[:5]:
        print(f"  invalid: {why}", flush=True)
    med = {arm: medians(runs[arm]) for arm in ARMS}
    del llm
    gc.collect()
    return {
        "batch": batch,
        "requests": n,
        "dtype": dtype_name,
        "grammar_compile_s": compile_s,
        "plain": {**med["plain"], "rounds": runs["plain"]},
        "schema": {**med["schema"], "rounds": runs["schema"]},
        "invalid": len(invalid),
        "invalid_examples": invalid[:5],
        "ratios": {
            "output_tok_s": med["schema"]["output_tok_s"] / med["plain"]["output_tok_s"],
            "step_ms": med["schema"]["step_ms"] / med["plain"]["step_ms"],
            "output_tok_per_cpu_s": med["schema"]["output_tok_per_cpu_s"]
            / med["plain"]["output_tok_per_cpu_s"],
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    """Side by side, one row per batch: medians over the rounds, plain / schema; ratios
    schema / plain. Grammar: the mask and the accepts, ms per step and share of the step."""
    rows = [
        "| batch | requests | output tok/s | ratio | output tok per CPU-s | ratio "
        "| ms/step | mask ms/step | accept ms/step | grammar share of step "
        "| mean output tokens | mean running batch | invalid |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for b in results:
        p, s, q = b["plain"], b["schema"], b["ratios"]
        rounds = len(s["rounds"])
        rows.append(
            f"| {b['batch']} | {b['requests']} | {p['output_tok_s']:.1f} / "
            f"{s['output_tok_s']:.1f} | {q['output_tok_s']:.2f}x | "
            f"{p['output_tok_per_cpu_s']:.1f} / {s['output_tok_per_cpu_s']:.1f} | "
            f"{q['output_tok_per_cpu_s']:.2f}x | {p['step_ms']:.1f} / {s['step_ms']:.1f} | "
            f"{s['mask_ms']:.2f} | {s['accept_ms']:.2f} | {s['grammar_share']:.1%} | "
            f"{p['mean_output_tokens']:.0f} / {s['mean_output_tokens']:.1f} | "
            f"{p['mean_running_batch']:.1f} / {s['mean_running_batch']:.1f} | "
            f"{b['invalid']}/{b['requests'] * rounds} |"
        )
    return "\n".join(rows)


def breakdown(results: list[dict[str, Any]]) -> str:
    """Where a step goes, ms per step (sample includes the grammar's mask and accept); CPU:
    this process's CPU time per step."""
    rows = [
        "| batch | arm | ms/step | CPU ms/step | prepare | forward | sample | of which mask "
        "| of which accept | rest | mean running batch |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in results:
        for arm in ARMS:
            r = b[arm]
            rows.append(
                f"| {b['batch']} | {arm} | {r['step_ms']:.2f} | {r['cpu_step_ms']:.2f} | "
                f"{r['prepare_ms']:.2f} | "
                f"{r['forward_ms']:.2f} | {r['sample_ms']:.2f} | {r['mask_ms']:.2f} | "
                f"{r['accept_ms']:.2f} | {r['rest_ms']:.2f} | {r['mean_running_batch']:.1f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the engine's dtype; auto (the default) picks what this CPU runs fastest",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 16, 64],
        help="requests in flight (max_num_seqs), one engine each (default 1 16 64)",
    )
    p.add_argument(
        "--waves", type=int, default=2, help="requests per batch: max(4, waves x batch) (2)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=160,
        help="both arms (default 160: above the schema's documents here, ~95-130 tokens)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="both arms (default 0: greedy); above 0, seeded per request",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds, plain then schema (default 2)"
    )
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache (default 512)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help=f"torch threads (default 0: torch's own, {torch.get_num_threads()} here); "
        "1 is steadier on a shared machine",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: the tiny test model (built in a temporary directory unless "
        "--model), batches 1 4, 1 round",
    )
    p.add_argument("--json", metavar="OUT", help="write the results here")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.rounds < 1 or args.waves < 1:
        p.error("--batches, --rounds and --waves must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with contextlib.ExitStack() as stack:
        if args.threads > 0:  # this process's setting is restored on return (tests call main)
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(args.threads)
        if args.quick:
            args.batches, args.rounds = [1, 4], 1
            if not args.model:
                from modelmaker import make_model

                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-so-"))
                args.model = str(make_model(Path(tmp) / "tiny", preset="tiny"))
        results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from modelmaker import ensure_default_model

    model_dir = args.model or str(ensure_default_model())
    cpu = CpuInfo.read()
    print(
        f"CPU: {cpu.model_name} ({os.cpu_count()} cpus; {' '.join(cpu.recorded()['flags'])}); "
        f"load average {os.getloadavg()[0]:.1f}\n"
        f"model {model_dir}, dtype {args.dtype}, torch threads "
        f"{torch.get_num_threads()}; batches {args.batches}, max_tokens {args.max_tokens}, "
        f"temperature {args.temperature}, {args.rounds} interleaved round(s)",
        flush=True,
    )
    timer = GrammarTimer()
    results = []
    with timer.installed():
        for batch in args.batches:
            results.append(run_batch(model_dir, batch, args, timer))
    md, steps = table(results), breakdown(results)
    dtype_name = results[0]["dtype"]
    load = os.getloadavg()
    print(
        f"\nCPU: {cpu.model_name}; dtype {dtype_name}, {torch.get_num_threads()} torch "
        f"thread(s); medians over {args.rounds} round(s); plain / schema; load average now "
        f"{load[0]:.1f} (1 min), {load[1]:.1f} (5 min), {load[2]:.1f} (15 min)\n"
    )
    print(md)
    print(f"\nms per step (CPU: {cpu.model_name})\n")
    print(steps)
    return {
        "cpu": cpu.recorded(),
        "model": model_dir,
        "dtype": dtype_name,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "schema": SCHEMA,
        "batches": results,
        "invalid": sum(b["invalid"] for b in results),
        "table": md,
        "breakdown": steps,
    }


if __name__ == "__main__":
    sys.exit(main())
