"""Decode timing of the engine on a CUDA GPU, in under 5 minutes. Informative: it asserts
nothing about correctness; that is the gpu test lane (`pytest -m gpu`, tests/gpu).

1. engine decode steps at batch 1/8/64/256 (~512-token prompts, the built-in `small` model,
   bfloat16): ms/step and achieved bandwidth (weight + KV bytes read per step over the step
   time), and the model runner's share of the step;
2. the Triton decode kernel alone against the PyTorch path at those batches, at the small
   model's shape and a Llama-3-8B-like one (32 query heads, 8 kv heads, head_dim 128).

Each part has a share of the time budget; cases that would not fit in what is left are
skipped, and a short budget (or --quick) times fewer sizes. On a machine without a CUDA GPU
it says so and exits 0. Exit status: 1 when a case failed to run, else 0.

    python bench/gpu_timing.py            # everything, within --budget-s (270 s)
    python bench/gpu_timing.py --quick    # batch 1/64, one attention shape

The functions take a `device` argument, so their logic can also be exercised on CPU
(PyTorch attention path, or the Triton kernel under TRITON_INTERPRET=1 with tiny shapes).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.paged_attention_inputs import DTYPE_NAMES, KernelCase, make_kernel_inputs
from bench.time_budget import Deadline, Pace, Report

# Nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOTAL_BUDGET_S = 270.0
# Below this much time the reduced set runs: batch 1 and 64, fewer steps, one shape.
FULL_SET_S = 60.0

AttnFn = Callable[..., torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _runner_seconds(timings: Any) -> float:
    """Seconds inside ModelRunner.execute (input prep, forward, sampling) summed over steps."""
    return sum(getattr(timings, f, 0.0) for f in ("prepare_s", "forward_s", "sample_s"))


def time_decode_steps(
    report: Report,
    device: str | torch.device,
    model_dir: Path,
    batches: Sequence[int],
    deadline: Deadline,
    prompt_len: int = 512,
    steps: int = 20,
    warmup: int = 3,
    dtype: str = "bfloat16",
    attention_backend: str = "auto",
) -> None:
    """Part 1: ms per engine decode step with B requests decoding, and the bandwidth it
    reaches: (parameter bytes + KV bytes read) per step over the step time."""
    from engine import LLM, SamplingParams
    from engine.config import ModelConfig
    from engine.dtype_choice import DTYPES

    dev = torch.device(device)
    print(
        f"\n== 1. engine decode step, {dtype}, ~{prompt_len}-token prompts, {steps} steps, "
        f"on {dev} ==",
        flush=True,
    )
    if deadline.left() <= 0:
        for b in batches:
            report.add(f"decode step B={b}", "SKIP", "time budget")
        return
    jitter = max(0, min(8, prompt_len // 4))
    max_tokens = warmup + steps + 8
    max_b = max(batches)
    mc = ModelConfig.from_pretrained(model_dir)
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    block = 16
    per_req_blocks = -(-(prompt_len + jitter + max_tokens + 1) // block)
    kv_bytes = (per_req_blocks * max_b + 8) * block * mc.kv_elements_per_token * elem
    llm = LLM(
        str(model_dir),
        dtype=dtype,
        device=str(dev),
        attention_backend=attention_backend,
        block_size=block,
        kv_cache_bytes=kv_bytes,
        max_num_seqs=max_b,
        max_num_batched_tokens=8192,
    )
    eng = llm.engine
    fn = eng.runner.model.decode_attention
    print(f"  decode attention: {fn.__module__}.{fn.__name__}", flush=True)
    weight_bytes = sum(p.nbytes for p in eng.runner.model.parameters())
    kv_per_token = mc.kv_elements_per_token * elem
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pace = Pace()
    for b in batches:
        name = f"decode step B={b}"
        if not pace.fits(deadline, b):
            report.add(name, "SKIP", "time budget")
            continue
        reqs = []
        case_t0 = time.monotonic()
        try:
            for _ in range(b):
                n = prompt_len + rng.randint(-jitter, jitter)
                reqs.append(
                    eng.make_request([rng.randrange(16, mc.vocab_size) for _ in range(n)], sp)
                )
            for r in reqs:
                eng.add_request(r)
            for _ in range(10_000):
                if all(r.num_computed_tokens >= r.num_prompt_tokens for r in reqs):
                    break
                eng.step()
            for _ in range(warmup):
                eng.step()
            decoding = all(
                r.num_tokens - r.num_computed_tokens == 1 and not r.is_finished for r in reqs
            )
            if not decoding or len(eng.scheduler.running) != b or eng.scheduler.waiting:
                raise RuntimeError(
                    f"expected {b} requests all decoding; running "
                    f"{len(eng.scheduler.running)}, waiting "
                    f"{len(eng.scheduler.waiting)}"
                )
            # Step i attends over num_tokens + i positions per request (its new token too).
            ctx_sum = sum(r.num_tokens for r in reqs)
            kv_tokens = steps * ctx_sum + b * steps * (steps - 1) // 2
            out0 = [r.num_output_tokens for r in reqs]
            run0 = _runner_seconds(eng.runner.timings)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            _sync(dev)
            elapsed = time.perf_counter() - t0
            in_runner = _runner_seconds(eng.runner.timings) - run0
            if any(r.num_output_tokens - o != steps for r, o in zip(reqs, out0, strict=True)):
                raise RuntimeError("not every request decoded one token per timed step")
            ms = elapsed / steps * 1e3
            moved = weight_bytes * steps + kv_tokens * kv_per_token
            report.add(
                name,
                "INFO",
                f"{ms:.2f} ms/step, {b * steps / elapsed:,.0f} tok/s, "
                f"{moved / elapsed / 1e9:.1f} GB/s (weights {weight_bytes / 1e6:.0f} MB + KV "
                f"{kv_tokens * kv_per_token / steps / 1e6:.1f} MB per step, mean ctx "
                f"{ctx_sum / b:.0f}); model runner {in_runner / elapsed:.0%} of step time",
            )
        except Exception as e:
            report.add(name, "FAIL", f"error: {type(e).__name__}: {e}")
        finally:
            for r in reqs:
                if not r.is_finished:
                    eng.abort_request(r.request_id)
            pace.record(b, case_t0)
    del llm, eng
    _free(dev)


@dataclass(frozen=True)
class AttnShape:
    name: str
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    ctx: int

    def case(self, dtype: torch.dtype, batch: int) -> KernelCase:
        return KernelCase(
            dtype, self.num_heads, self.kv_heads, self.head_dim, self.block_size, batch, self.ctx
        )


def _time_fn(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Seconds per call, after a warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def time_kernels(
    report: Report,
    device: str | torch.device,
    shapes: Sequence[AttnShape],
    batches: Sequence[int],
    deadline: Deadline,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 50,
    triton_fn: AttnFn | None = None,
    torch_fn: AttnFn | None = None,
) -> None:
    """Part 2: one decode-attention call, Triton kernel against the PyTorch path."""
    from engine import attention, triton_attention

    dev = torch.device(device)
    print(
        f"\n== 2. decode attention alone, {DTYPE_NAMES[dtype]}, {iters} calls each, on {dev} ==",
        flush=True,
    )
    if triton_fn is None:
        if not triton_attention.triton_available():
            report.add("kernel timing", "SKIP", "triton is not importable")
            return
        triton_fn = triton_attention.paged_decode_attention_triton
    torch_fn = torch_fn or attention.paged_decode_attention
    for shape in shapes:
        pace = Pace()
        for b in batches:
            name = f"attention {shape.name} B={b}"
            if not pace.fits(deadline, b):
                report.add(name, "SKIP", "time budget")
                continue
            t0 = time.monotonic()
            try:
                rng = random.Random(b)
                jitter = max(0, min(8, shape.ctx // 4))
                lens = [shape.ctx + rng.randint(-jitter, jitter) for _ in range(b)]
                q, k, v, tables, ctx = make_kernel_inputs(shape.case(dtype, b), lens, dev, seed=b)
                scale = shape.head_dim**-0.5
                t_tri = _time_fn(
                    functools.partial(triton_fn, q, k, v, tables, ctx, scale), dev, iters
                )
                t_tor = _time_fn(
                    functools.partial(torch_fn, q, k, v, tables, ctx, scale), dev, iters
                )
                kv_read = sum(lens) * shape.kv_heads * shape.head_dim * 2 * k.element_size()
                report.add(
                    name,
                    "INFO",
                    f"triton {t_tri * 1e6:,.1f} us ({kv_read / t_tri / 1e9:.1f} GB/s of KV), "
                    f"torch {t_tor * 1e6:,.1f} us ({kv_read / t_tor / 1e9:.1f} GB/s), "
                    f"triton speedup {t_tor / t_tri:.2f}x (mean ctx {sum(lens) / b:.0f})",
                )
                del q, k, v, tables, ctx
                _free(dev)
            except Exception as e:
                report.add(name, "FAIL", f"error: {type(e).__name__}: {e}")
                _free(dev)
            finally:
                pace.record(b, t0)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_timing(
    device: str | torch.device,
    small_model_dir: Path,
    *,
    quick: bool = False,
    budget_s: float = TOTAL_BUDGET_S,
    batches: Sequence[int] | None = None,
    prompt_len: int = 512,
    shapes: Sequence[AttnShape] | None = None,
) -> Report:
    """Both parts under one time budget; the keyword overrides exist for CPU dry runs."""
    report = Report()
    deadline = Deadline(time.monotonic() + budget_s)
    reduced = quick or deadline.left() < FULL_SET_S
    batches = batches or ((1, 64) if reduced else (1, 8, 64, 256))
    steps = 10 if reduced else 20
    # The engine's decode steps get at most two thirds of the time; the kernel alone the rest.
    part = Deadline(time.monotonic() + deadline.left() * 2 / 3)
    time_decode_steps(
        report, device, small_model_dir, batches, part, prompt_len=prompt_len, steps=steps
    )
    if shapes is None:
        shapes = [
            AttnShape("small-model h8/kv4 d64 bs16", 8, 4, 64, 16, prompt_len + 16),
            AttnShape("llama3-8b h32/kv8 d128 bs16", 32, 8, 128, 16, 2048),
        ]
        if reduced:
            shapes = shapes[:1]
    time_kernels(report, device, shapes, batches, deadline, iters=20 if reduced else 50)
    return report


def _versions() -> str:
    parts = [f"torch {torch.__version__}", f"cuda {torch.version.cuda}"]
    for mod in ("triton", "transformers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            parts.append(f"{mod} missing")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="gpu_timing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="reduced set: batch 1/64, 10 steps, the small model's attention shape only",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=TOTAL_BUDGET_S,
        help=f"time budget, in seconds (default {TOTAL_BUDGET_S:.0f}); "
        "cases that would not fit are skipped",
    )
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        build = torch.version.cuda or "no"
        print(
            f"gpu_timing: no CUDA GPU found (torch {torch.__version__}, cuda build: {build}); "
            "nothing to time"
        )
        return 0

    t0 = time.monotonic()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    print(f"gpu_timing: {torch.cuda.get_device_name(0)}; {_versions()}", flush=True)
    from modelmaker import make_model

    with tempfile.TemporaryDirectory(prefix="gpu_timing_") as tmp:
        small = make_model(Path(tmp) / "small", preset="small")
        print(f"built the small model in {time.monotonic() - t0:.1f}s", flush=True)
        budget = args.budget_s - (time.monotonic() - t0)
        report = run_timing("cuda", small, quick=args.quick, budget_s=budget)
    print(f"\n== summary ({time.monotonic() - t0:.0f}s) ==")
    print(report.table())
    fails = sum(r.status == "FAIL" for r in report.results)
    skips = sum(r.status == "SKIP" for r in report.results)
    timed = sum(r.status == "INFO" for r in report.results)
    skipped = f", {skips} skipped" if skips else ""
    if fails:
        print(f"gpu_timing: FAILED: {fails} case(s) did not run, {timed} timed{skipped}")
    else:
        print(f"gpu_timing: {timed} cases timed{skipped}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
