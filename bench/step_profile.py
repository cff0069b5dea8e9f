"""Where a decode step's time goes, by kind of work, at a given running batch.

Runs the engine (default model, default dtype and kernels) with `batch`
requests decoding (~128-token prompts), then profiles `--steps` steps with
the torch profiler and groups the time of the operators into:

  gemm          the linear layers (qkv, o, gate/up, down) and the lm_head
  attention     the paged decode-attention kernel and the KV writes
  elementwise   norms, rotary embedding, activations, residual adds, casts
  sampling      the sampler's operators
  python        what no operator accounts for: scheduling, input
                preparation, bookkeeping (step wall time minus operators)

and prints ms per step for each, with the GEMMs' achieved GFLOP/s; compare
with `bench/gemm.py`, which measures this machine's GEMM libraries alone.

    python bench/step_profile.py                      # batch 16 and 64
    python bench/step_profile.py --batches 16 --trace /tmp/step.json
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine import LLM, SamplingParams

_KINDS = {
    "gemm": ("linear", "addmm", "mm", "matmul", "_linear_pointwise", "_mkl_linear"),
    "attention": ("paged_decode", "index_copy", "index_put", "scaled_dot_product", "softmax"),
    "sampling": ("sample", "argmax", "topk", "multinomial", "log_softmax", "gather", "sort"),
}


def kind_of(op: str) -> str:
    name = op.lower().split("::")[-1]
    for kind, names in _KINDS.items():
        if any(name == n or name.startswith(n) for n in names):
            return kind
    return "elementwise"


def profile_batch(llm: LLM, batch: int, steps: int, trace: str | None) -> dict[str, float]:
    eng = llm.engine
    vocab = eng.model_config.vocab_size
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    for r in reqs:
        eng.abort_request(r.request_id)
    if trace:
        prof.export_chrome_trace(trace)
    by_kind = dict.fromkeys(("gemm", "attention", "elementwise", "sampling"), 0.0)
    gemm_flops = 0
    for ev in prof.key_averages():
        # Self time only: a parent op (e.g. aten::linear) is not counted twice.
        by_kind[kind_of(ev.key)] += ev.self_cpu_time_total / 1e3 / steps
        gemm_flops += ev.flops or 0
    cfg = eng.model_config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = (
        cfg.num_layers
        * (
            cfg.hidden_size * (q + 2 * kv)
            + q * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size
        )
        + cfg.hidden_size * cfg.vocab_size
    )
    flops = 2 * per_token * batch
    ops_ms = sum(by_kind.values())
    return {
        "batch": batch,
        "step_ms": wall_ms,
        **{f"{k}_ms": v for k, v in by_kind.items()},
        "python_ms": max(0.0, wall_ms - ops_ms),
        "gemm_gflops": flops / by_kind["gemm"] / 1e6 if by_kind["gemm"] else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="model directory (default: the built-in model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--linear-backend", default="auto", choices=["auto", "torch", "onednn"])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trace", help="write a Chrome trace of the last batch here")
    args = ap.parse_args()
    llm = LLM(
        args.model,
        dtype=args.dtype,
        linear_backend=args.linear_backend,
        kv_cache_bytes=512 * 2**20,
        max_num_seqs=max(int(b) for b in args.batches.split(",")),
    )
    runner = llm.engine.runner
    # The C decode-attention kernel is called through ctypes, invisible to the
    # profiler: label it so its time is counted as attention.
    attend = runner.model.decode_attention

    def labelled_attention(*a, **kw):
        with torch.profiler.record_function("paged_decode_attention"):
            return attend(*a, **kw)

    runner.model.decode_attention = labelled_attention
    from engine import sampler  # the greedy argmax is a ctypes kernel too

    sample = sampler.sample

    def labelled_sample(*a, **kw):
        with torch.profiler.record_function("sample"):
            return sample(*a, **kw)

    sampler.sample = labelled_sample
    print(
        f"dtype {str(runner.dtype).removeprefix('torch.')}, linear layers {runner.linear_backend}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for b in (int(x) for x in args.batches.split(",")):
        r = profile_batch(llm, b, args.steps, args.trace)
        print(
            f"batch {b:3d}: {r['step_ms']:6.1f} ms/step = gemm {r['gemm_ms']:.1f} "
            f"({r['gemm_gflops']:.0f} GFLOP/s) + attention {r['attention_ms']:.1f} "
            f"+ elementwise {r['elementwise_ms']:.1f} + sampling {r['sampling_ms']:.1f} "
            f"+ python {r['python_ms']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
