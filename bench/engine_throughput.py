"""Offline throughput: splitserve's engine against naive static batching.

Both run in this process, one after the other, on the same model, dtype and
requests:

(a) baseline: transformers `generate`, static batches of 8 in arrival order;
    each batch runs until its longest request is done, and only each
    request's own tokens are counted;
(b) splitserve: every request submitted at once to the engine (paged KV,
    iteration-level scheduling, chunked prefill).

Requests: prompts of ~128 random tokens, output lengths drawn with a fixed
seed from the seed workload's {32, 40, 50, 64, 80, 96, 200, 512}, each exact
(EOS ignored).

Also reported: the engine's average running batch, and where engine wall
time goes: the model's forward pass (with the LM head), sampling, and the
rest (scheduler, input preparation, stop checks, Python), overall and in a
steady decode phase at batch 16 and 64 (side by side: oneDNN-packed linear
layers against nn.Linear's MKL path, the C decode kernel against the PyTorch
attention path, and bfloat16 against float32).

    python bench/engine_throughput.py                 # default model and dtype
    python bench/engine_throughput.py --num-requests 64 --model DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass

import torch

from engine import LLM
from engine.llm_engine import LLMEngine
from engine.model_runner import StepTimings

OUTPUT_LENGTHS = (32, 40, 50, 64, 80, 96, 200, 512)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def seeded(cls, n: int, vocab: int, prompt_len: int, seed: int) -> Workload:
        rng = random.Random(seed)
        # Avoid the special ids at the bottom of the vocabulary.
        prompts = [
            [rng.randrange(16, vocab) for _ in range(prompt_len + rng.randrange(-8, 9))]
            for _ in range(n)
        ]
        return cls(prompts, [rng.choice(OUTPUT_LENGTHS) for _ in range(n)])

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def run_static_baseline(model_dir: str, w: Workload, dtype: torch.dtype, batch: int) -> float:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = 0
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(w.prompts), batch), desc="baseline", unit="batch"):
        prompts = w.prompts[start : start + batch]
        longest_out = max(w.output_lens[start : start + batch])
        width = max(len(p) for p in prompts)
        # Left padding, as decoder-only generation requires.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=longest_out,
                min_new_tokens=longest_out,
                pad_token_id=pad,
            )
    return time.perf_counter() - t0


def time_shares(eng: LLMEngine, wall_s: float, before: StepTimings) -> dict[str, float]:
    """Shares of `wall_s` spent in the forward pass, in sampling, and elsewhere."""
    t = eng.runner.timings
    forward = t.forward_s - before.forward_s
    sampling = t.sample_s - before.sample_s
    return {
        "forward_share": forward / wall_s,
        "sampling_share": sampling / wall_s,
        "overhead_share": 1 - (forward + sampling) / wall_s,
    }


def shares_text(r: dict[str, float]) -> str:
    return (
        f"forward {r['forward_share'] * 100:.1f}%, sampling {r['sampling_share'] * 100:.1f}%, "
        f"scheduler+Python {r['overhead_share'] * 100:.1f}%"
    )


def run_engine(llm: LLM, w: Workload) -> dict[str, float]:
    from engine import SamplingParams

    eng = llm.engine
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    steps0, running0 = eng.scheduler.stats.num_steps, eng.scheduler.stats.running_batch_sum
    before = copy.copy(eng.runner.timings)
    t0 = time.perf_counter()
    outs = llm.generate(w.prompts, params)
    elapsed = time.perf_counter() - t0
    got = sum(len(o.token_ids) for o in outs)
    assert got == w.output_tokens, (got, w.output_tokens)
    steps = eng.scheduler.stats.num_steps - steps0
    return {
        "seconds": elapsed,
        "steps": steps,
        "mean_running_batch": (eng.scheduler.stats.running_batch_sum - running0) / steps,
        "preemptions": sum(o.num_preemptions for o in outs),
        **time_shares(eng, elapsed, before),
    }


def steady_step(llm: LLM, batch: int, steps: int, vocab: int) -> dict[str, float]:
    """Time decode steps with `batch` requests running (prompts of 128 tokens):
    ms per step and where the time goes."""
    from engine import SamplingParams

    eng = llm.engine
    rng = random.Random(1)
    sp = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
    reqs = [
        eng.make_request([rng.randrange(16, vocab) for _ in range(128)], sp) for _ in range(batch)
    ]
    for r in reqs:
        eng.add_request(r)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
        eng.step()
    for _ in range(3):
        eng.step()
    before, t0 = copy.copy(eng.runner.timings), time.perf_counter()
    for _ in range(steps):
        eng.step()
    elapsed = time.perf_counter() - t0
    for r in reqs:
        eng.abort_request(r.request_id)
    return {
        "batch": batch,
        "step_ms": elapsed / steps * 1000,
        **time_shares(eng, elapsed, before),
    }


def compare_steady(model_dir: str, vocab: int, batch: int, steps: int) -> dict[str, dict]:
    """Side by side, interleaved twice: float32 with the C decode kernel and
    oneDNN-packed linears (the default on CPUs without native bfloat16)
    against nn.Linear (MKL), the PyTorch attention path, and bfloat16."""
    variants = {  # name: (dtype, attention backend, linear backend)
        "float32+cpu-kernel+onednn": ("float32", "cpu", "onednn"),
        "float32+cpu-kernel+mkl": ("float32", "cpu", "torch"),
        "float32+torch-attention+onednn": ("float32", "torch", "onednn"),
        "bfloat16+cpu-kernel": ("bfloat16", "cpu", "torch"),
    }
    llms = {
        name: LLM(
            model_dir,
            dtype=dtype,
            attention_backend=backend,
            linear_backend=linear,
            kv_cache_bytes=512 * 2**20,
            max_num_seqs=batch,
        )
        for name, (dtype, backend, linear) in variants.items()
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(2):
        for name, llm in llms.items():
            runs[name].append(steady_step(llm, batch, steps, vocab))
    return {name: min(r, key=lambda x: x["step_ms"]) for name, r in runs.items()}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="model directory (default: the built-in small model)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the engine's dtype; auto (the default) picks what this CPU runs fastest",
    )
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baseline", action="store_true", help="engine figures only")
    ap.add_argument("--skip-steady", action="store_true", help="skip the decode-step comparisons")
    ap.add_argument(
        "--steady-batches",
        default="16,64",
        help="running batch sizes of the side-by-side decode-step comparisons",
    )
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    from modelmaker import ensure_default_model

    model_dir = args.model or str(ensure_default_model())
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        max_num_seqs=args.max_num_seqs,
    )
    vocab = llm.engine.model_config.vocab_size
    dtype = llm.engine.runner.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    w = Workload.seeded(args.num_requests, vocab, args.prompt_len, args.seed)
    print(
        f"{len(w.prompts)} requests, {w.output_tokens} output tokens, dtype {dtype_name} "
        f"({args.dtype}), linear layers {llm.engine.runner.linear_backend}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    # Warm up the engine (allocator, kernels) on a few requests first.
    run_engine(llm, Workload(w.prompts[:4], [8] * 4))
    engine = run_engine(llm, w)
    engine_tps = w.output_tokens / engine["seconds"]
    result: dict = {
        "workload": {"requests": len(w.prompts), "output_tokens": w.output_tokens},
        "engine": {**engine, "tokens_per_s": engine_tps},
    }
    print(
        f"engine:   {engine_tps:8.0f} tok/s  ({engine['seconds']:.1f}s, mean running batch "
        f"{engine['mean_running_batch']:.1f}, {engine['preemptions']} preemptions)\n"
        f"          {shares_text(engine)}",
        flush=True,
    )
    del llm  # free the engine's KV cache before the next runs
    for batch in [] if args.skip_steady else [int(b) for b in args.steady_batches.split(",")]:
        steady = compare_steady(model_dir, vocab, batch=batch, steps=24)
        result[f"steady_batch{batch}"] = steady
        for name, r in steady.items():
            print(
                f"steady batch {batch}, {name:30s} {r['step_ms']:6.1f} ms/step, {shares_text(r)}",
                flush=True,
            )
    if not args.skip_baseline:
        base_s = run_static_baseline(model_dir, w, dtype, args.static_batch)
        base_tps = w.output_tokens / base_s
        result["baseline"] = {"seconds": base_s, "tokens_per_s": base_tps}
        result["ratio"] = engine_tps / base_tps
        print(
            f"baseline: {base_tps:8.0f} tok/s  ({base_s:.1f}s, transformers generate, "
            f"static batches of {args.static_batch})"
        )
        print(f"ratio:    {engine_tps / base_tps:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
