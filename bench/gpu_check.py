"""GPU checks for the engine: correctness on CUDA, then decode timing. Runs in under 5 minutes.

1. equality: the engine's greedy tokens against transformers `generate`, on the built-in
   `tiny` and `small` llama models in float32, with the Triton decode kernel and with the
   PyTorch path (must be identical: "k/8 prompts identical"); bfloat16 on `small` is
   reported only (fraction of tokens matching up to the first divergence).
2. kernel: `paged_decode_attention_triton` against `engine.attention.paged_decode_attention`
   at Llama-3-8B-like shapes (32 query heads, 8 kv heads, head_dim 128), block sizes 16 and
   32, batch 1/8/64/256, ragged contexts up to 4096, in float32 (TF32 off), bfloat16 and
   float16; max abs error per case against a tolerance per dtype.
3. timing (informative): engine decode steps at batch 1/8/64/256 (~512-token prompts,
   small model, bfloat16): ms/step and achieved bandwidth (weight + KV bytes read per step
   over the step time); then the Triton kernel alone against the PyTorch path at those shapes.

Each section has a time budget; later sections shrink (fewer sizes) or skip cases when
earlier ones ran long. On a machine without a CUDA GPU it says so and exits 0. Exit status:
0 when every correctness check passed, 1 when any failed.

    python bench/gpu_check.py                # everything (~2-4 minutes on an H100)
    python bench/gpu_check.py --quick        # reduced sizes
    python bench/gpu_check.py --skip-timing  # correctness only

The section functions take a `device` argument, so their logic can also be exercised on CPU
(PyTorch attention path, or the Triton kernel under TRITON_INTERPRET=1 with tiny shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOTAL_BUDGET_S = 270.0
NUM_PROMPTS = 8
NEW_TOKENS = 64
# Prompt lengths: one token, block-boundary neighbours (block size 16), up to 33 blocks.
PROMPT_LENGTHS = (1, 7, 16, 33, 80, 150, 300, 513)
KERNEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

AttnFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Report and time budget
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    section: str
    check: str
    status: str  # PASS, FAIL, INFO or SKIP; only FAIL makes the exit status non-zero
    detail: str


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, section: str, check: str, status: str, detail: str) -> None:
        self.results.append(Result(section, check, status, detail))
        print(f"  [{status}] {check}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.results)

    def table(self) -> str:
        heads = ("section", "check", "status", "detail")
        rows = [(r.section, r.check, r.status, r.detail) for r in self.results]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads[:3])]
        lines = []
        for row in [heads, (*("-" * w for w in widths), "-" * 6), *rows]:
            lines.append(
                "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
            )
        return "\n".join(lines)


class Deadline:
    """An absolute point in time (time.monotonic) a section must finish by."""

    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        return self.at - time.monotonic()

    @classmethod
    def unlimited(cls) -> Deadline:
        return cls(math.inf)


class Budget:
    """The whole run's time: each section gets a share, cut so later sections keep theirs,
    but never to less than half of what is left (earlier sections are the correctness ones)."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def section(self, share_s: float, keep_for_later_s: float) -> Deadline:
        left = self.left()
        allowed = min(share_s, max(left - keep_for_later_s, left / 2))
        return Deadline(time.monotonic() + max(0.0, allowed))


class Pace:
    """Guesses how long the next case takes from the last one, scaled by its size (batch)."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def estimate(self, size: int) -> float:
        if self.last is None:
            return 0.0
        last_size, secs = self.last
        return secs * max(1.0, size / max(1, last_size))

    def fits(self, deadline: Deadline, size: int) -> bool:
        return deadline.left() > self.estimate(size)

    def record(self, size: int, since: float) -> None:
        """The case of this size started at time.monotonic() `since` and is done now."""
        self.last = (size, time.monotonic() - since)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tf32_state() -> str:
    return (
        f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
    )


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full-precision float32 matmuls (and cuDNN) inside, restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])


# ---------------------------------------------------------------------------------------------
# 1. engine against transformers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EqConfig:
    preset: str  # a key of the model_dirs mapping
    dtype: str  # "float32", "bfloat16" or "float16"
    backend: str  # the engine's attention_backend
    required: bool  # must be identical (PASS/FAIL) or only reported (INFO)

    @property
    def name(self) -> str:
        return f"{self.preset} {self.dtype} {self.backend}"


def equality_configs(quick: bool, triton_backend: str = "triton") -> list[EqConfig]:
    configs = [
        EqConfig("tiny", "float32", triton_backend, True),
        EqConfig("tiny", "float32", "torch", True),
        EqConfig("small", "float32", triton_backend, True),
        EqConfig("small", "float32", "torch", True),
        EqConfig("small", "bfloat16", triton_backend, False),
    ]
    if quick:
        configs = [c for c in configs if not (c.preset == "small" and c.backend == "torch")]
    return configs


def make_prompts(vocab: int, n: int = NUM_PROMPTS, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of different lengths, avoiding the special ids at the bottom."""
    rng = random.Random(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(n)]
    return [[rng.randrange(16, vocab) for _ in range(length)] for length in lengths]


def hf_greedy(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    prompts: Sequence[list[int]],
    new_tokens: int,
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            outs.append(out[0, len(p) :].tolist())
    del model
    _free(device)
    return outs


def engine_greedy(
    model_dir: Path,
    cfg: EqConfig,
    device: torch.device,
    prompts: Sequence[list[int]],
    new_tokens: int,
) -> tuple[list[list[int]], str]:
    """The engine's greedy tokens, and the name of the decode-attention function it used."""
    from engine import LLM, SamplingParams

    # A small step budget, so prefill chunks ride along with decode rows (mixed batches).
    llm = LLM(
        str(model_dir),
        dtype=cfg.dtype,
        device=str(device),
        attention_backend=cfg.backend,
        kv_cache_bytes=256 * 2**20,
        max_num_batched_tokens=256,
    )
    fn = llm.engine.runner.model.decode_attention
    used = f"{fn.__module__}.{fn.__name__}"
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    tokens = [o.token_ids for o in outs]
    del llm, outs
    _free(device)
    return tokens, used


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_vs_transformers(
    report: Report,
    device: str | torch.device,
    model_dirs: dict[str, Path],
    configs: Sequence[EqConfig],
    deadline: Deadline,
    num_prompts: int = NUM_PROMPTS,
    new_tokens: int = NEW_TOKENS,
) -> None:
    """Section 1: greedy tokens of the engine against transformers, per config."""
    from engine.config import ModelConfig
    from engine.dtype_choice import DTYPES

    dev = torch.device(device)
    section = "equality"
    print(
        f"\n== 1. engine vs transformers, greedy, {num_prompts} prompts x {new_tokens} "
        f"tokens on {dev} ==",
        flush=True,
    )
    refs: dict[tuple[str, str], list[list[int]]] = {}
    spent: dict[str, float] = {}  # seconds the last config of a preset took: the estimate
    with no_tf32():
        for cfg in configs:
            estimate = spent.get(cfg.preset, 5.0)
            if deadline.left() < estimate:
                report.add(
                    section,
                    cfg.name,
                    "SKIP",
                    f"time budget ({deadline.left():.0f}s left, ~{estimate:.0f}s needed)",
                )
                continue
            t0 = time.monotonic()
            status_fail = "FAIL" if cfg.required else "INFO"
            try:
                model_dir = model_dirs[cfg.preset]
                vocab = ModelConfig.from_pretrained(model_dir).vocab_size
                prompts = make_prompts(vocab, num_prompts)
                key = (cfg.preset, cfg.dtype)
                if key not in refs:
                    refs[key] = hf_greedy(model_dir, DTYPES[cfg.dtype], dev, prompts, new_tokens)
                want = refs[key]
                got, used = engine_greedy(model_dir, cfg, dev, prompts, new_tokens)
            except Exception as e:  # report it and go on with the other configs
                report.add(section, cfg.name, status_fail, f"error: {type(e).__name__}: {e}")
                spent[cfg.preset] = time.monotonic() - t0
                continue
            spent[cfg.preset] = time.monotonic() - t0
            same = sum(g == w for g, w in zip(got, want, strict=True))
            prefix = sum(_common_prefix(g, w) for g, w in zip(got, want, strict=True))
            total = sum(len(w) for w in want)
            distinct = min(len(set(g)) for g in got)
            detail = f"{same}/{len(prompts)} prompts identical"
            if cfg.backend == "triton" and "triton" not in used:
                report.add(
                    section,
                    cfg.name,
                    status_fail,
                    f"{detail}, but decode attention fell back to {used}",
                )
                continue
            if cfg.required:
                if same == len(prompts) and all(len(g) == new_tokens for g in got):
                    report.add(
                        section,
                        cfg.name,
                        "PASS",
                        f"{detail} (min {distinct} distinct tokens per output)",
                    )
                else:
                    bad = next(
                        (len(p), _common_prefix(g, w))
                        for p, g, w in zip(prompts, got, want, strict=True)
                        if g != w
                    )
                    report.add(
                        section,
                        cfg.name,
                        "FAIL",
                        f"{detail}; first mismatch: prompt of {bad[0]} tokens diverges at "
                        f"output token {bad[1]}",
                    )
                continue
            detail += (
                f"; {prefix}/{total} tokens ({prefix / total:.0%}) match up to the first "
                f"divergence vs transformers {cfg.dtype}"
            )
            ref32 = refs.get((cfg.preset, "float32"))
            if ref32 is not None and cfg.dtype != "float32":
                p32 = sum(_common_prefix(g, w) for g, w in zip(got, ref32, strict=True))
                detail += f", {p32 / total:.0%} vs transformers float32"
            report.add(section, cfg.name, "INFO", detail)


# ---------------------------------------------------------------------------------------------
# 2. the Triton kernel against the PyTorch path
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCase:
    dtype: torch.dtype
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    batch: int
    max_ctx: int
    window: int | None = None
    table_dtype: torch.dtype = torch.int64
    strided_q: bool = False  # q as a view into a fused qkv tensor, as the model passes it

    @property
    def name(self) -> str:
        extra = ""
        if self.window is not None:
            extra += f" win{self.window}"
        if self.table_dtype != torch.int64:
            extra += " int32-tables"
        if self.strided_q:
            extra += " strided-q"
        return (
            f"{DTYPE_NAMES[self.dtype]} h{self.num_heads}/kv{self.kv_heads} "
            f"d{self.head_dim} bs{self.block_size} B{self.batch} ctx<={self.max_ctx}{extra}"
        )


def kernel_cases(
    quick: bool,
    num_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    max_ctx: int = 4096,
    batches: Sequence[int] | None = None,
    block_sizes: Sequence[int] | None = None,
) -> list[KernelCase]:
    """Llama-3-8B-like shapes by default. Cheap cases first, so a cut budget drops big ones."""
    if batches is None:
        batches = (1, 64) if quick else (1, 8, 64, 256)
    if block_sizes is None:
        block_sizes = (16,) if quick else (16, 32)
    if quick:
        max_ctx = min(max_ctx, 2048)
    cases = []
    for b in sorted(batches):
        for bs in block_sizes:
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                cases.append(
                    KernelCase(
                        dt,
                        num_heads,
                        kv_heads,
                        head_dim,
                        bs,
                        b,
                        max_ctx,
                        strided_q=bs != block_sizes[0],
                    )
                )
    # A sliding window shorter than most contexts, with int32 block tables.
    mid = sorted(batches)[len(batches) // 2]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(
            KernelCase(
                dt,
                num_heads,
                kv_heads,
                head_dim,
                block_sizes[0],
                mid,
                max_ctx,
                window=max(1, max_ctx // 4) + 3,
                table_dtype=torch.int32,
            )
        )
    return cases


def context_lengths(batch: int, max_ctx: int, block_size: int, seed: int) -> list[int]:
    """Ragged lengths in [1, max_ctx], with the edge cases (1, max, block boundaries) first."""
    if batch == 1:
        return [max_ctx]
    rng = random.Random(seed)
    special = [1, max_ctx, block_size, block_size + 1, max(1, max_ctx - 1)]
    lens = special[: min(batch, len(special))]
    lens += [rng.randint(1, max_ctx) for _ in range(batch - len(lens))]
    rng.shuffle(lens)
    return lens


def make_kernel_inputs(
    case: KernelCase, lens: Sequence[int], device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_cache, v_cache, block_tables, context_lens for one case.

    Physical blocks come from a shuffled pool, so a row's blocks are not contiguous; table
    entries past a row's context are padding that points at blocks owned by no row.
    """
    b, bs = case.batch, case.block_size
    used = [-(-n // bs) for n in lens]
    max_blocks = max(used)
    spare = 4
    num_blocks = sum(used) + spare
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, bs, case.kv_heads, case.head_dim)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(case.dtype)

    if case.strided_q:
        qkv = randn(b, (case.num_heads + 2 * case.kv_heads) * case.head_dim)
        q = qkv[:, : case.num_heads * case.head_dim].view(b, case.num_heads, case.head_dim)
    else:
        q = randn(b, case.num_heads, case.head_dim)
    k_cache = randn(*shape)
    # Half-scale values keep outputs below 2-4 in magnitude, where one bf16 ulp is < 2e-2.
    v_cache = randn(*shape) * 0.5
    perm = torch.randperm(num_blocks, generator=cpu_gen)
    tables = torch.empty(b, max_blocks, dtype=torch.int64)
    pos = 0
    for i, n in enumerate(used):
        tables[i, :n] = perm[pos : pos + n]
        tables[i, n:] = perm[num_blocks - spare + i % spare]
        pos += n
    ctx = torch.tensor(list(lens), dtype=torch.int64)
    return (q, k_cache, v_cache, tables.to(device=device, dtype=case.table_dtype), ctx.to(device))


def _ref_fits(case: KernelCase, lens: Sequence[int], device: torch.device) -> bool:
    """Whether a float64 reference (upcast caches plus the PyTorch path's gathered copies)
    fits comfortably in memory."""
    tokens_cached = sum(-(-n // case.block_size) for n in lens) * case.block_size
    tokens_gathered = case.batch * max(-(-n // case.block_size) for n in lens) * case.block_size
    need = 2 * (tokens_cached + tokens_gathered) * case.kv_heads * case.head_dim * 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.4 * free
    return need < 2 * 2**30


def check_kernel(
    report: Report,
    device: str | torch.device,
    cases: Sequence[KernelCase],
    deadline: Deadline,
    triton_fn: AttnFn | None = None,
    torch_fn: AttnFn | None = None,
) -> None:
    """Section 2: max abs difference, Triton kernel against the PyTorch path, per case.

    Also shown, where memory allows: each one's error against a float64 reference on the
    same (rounded) inputs, to tell which side a difference comes from.
    """
    from engine import attention, triton_attention

    dev = torch.device(device)
    section = "kernel"
    print(f"\n== 2. Triton decode kernel vs PyTorch path on {dev} ==", flush=True)
    report.add(
        section,
        "tf32",
        "INFO",
        f"before: {tf32_state()}; float32 cases run with TF32 off (the kernel uses no "
        "tl.dot, so no TF32 either), which is what the 1e-3 float32 tolerance assumes",
    )
    if triton_fn is None:
        if not triton_attention.triton_available():
            report.add(
                section,
                "triton",
                "FAIL",
                "triton is not importable (pip install 'splitserve[triton]')",
            )
            return
        triton_fn = triton_attention.paged_decode_attention_triton
    torch_fn = torch_fn or attention.paged_decode_attention
    pace = Pace()
    with no_tf32():
        for seed, case in enumerate(cases):
            if not pace.fits(deadline, case.batch):
                report.add(section, case.name, "SKIP", "time budget")
                continue
            tol = KERNEL_TOL[case.dtype]
            t0 = time.monotonic()
            try:
                lens = context_lengths(case.batch, case.max_ctx, case.block_size, seed)
                q, k, v, tables, ctx = make_kernel_inputs(case, lens, dev, seed)
                scale = case.head_dim**-0.5
                got = triton_fn(q, k, v, tables, ctx, scale, case.window)
                want = torch_fn(q, k, v, tables.long(), ctx, scale, case.window)
                _sync(dev)
                finite = bool(torch.isfinite(got).all())
                diff = (got.float() - want.float()).abs().max().item()
                extra = ""
                if _ref_fits(case, lens, dev):
                    ref = torch_fn(
                        q.double(), k.double(), v.double(), tables.long(), ctx, scale, case.window
                    )
                    e_tri = (got.double() - ref).abs().max().item()
                    e_tor = (want.double() - ref).abs().max().item()
                    extra = f" (vs float64 reference: triton {e_tri:.2e}, torch {e_tor:.2e})"
                    del ref
                del q, k, v, tables, ctx, got, want
                _free(dev)
            except Exception as e:  # report it and go on with the other cases
                report.add(section, case.name, "FAIL", f"error: {type(e).__name__}: {e}")
                _free(dev)
                continue
            finally:
                pace.record(case.batch, t0)
            ok = finite and diff <= tol
            report.add(
                section,
                case.name,
                "PASS" if ok else "FAIL",
                f"max abs err {diff:.2e} (tol {tol:.0e})"
                + ("" if finite else ", NON-FINITE output")
                + extra,
            )


# ---------------------------------------------------------------------------------------------
# 3. timing
# ---------------------------------------------------------------------------------------------


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
    """Section 3a: ms per engine decode step with B requests decoding, and the bandwidth it
    reaches: (parameter bytes + KV bytes read) per step over the step time."""
    from engine import LLM, SamplingParams
    from engine.config import ModelConfig
    from engine.dtype_choice import DTYPES

    dev = torch.device(device)
    section = "timing"
    print(
        f"\n== 3a. engine decode step, {dtype}, ~{prompt_len}-token prompts, {steps} steps, "
        f"on {dev} ==",
        flush=True,
    )
    if deadline.left() <= 0:
        for b in batches:
            report.add(section, f"decode step B={b}", "SKIP", "time budget")
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
            report.add(section, name, "SKIP", "time budget")
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
                section,
                name,
                "INFO",
                f"{ms:.2f} ms/step, {b * steps / elapsed:,.0f} tok/s, "
                f"{moved / elapsed / 1e9:.1f} GB/s (weights {weight_bytes / 1e6:.0f} MB + KV "
                f"{kv_tokens * kv_per_token / steps / 1e6:.1f} MB per step, mean ctx "
                f"{ctx_sum / b:.0f}); model runner {in_runner / elapsed:.0%} of step time",
            )
        except Exception as e:
            report.add(section, name, "FAIL", f"error: {type(e).__name__}: {e}")
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
    """Section 3b: one decode-attention call, Triton kernel against the PyTorch path."""
    from engine import attention, triton_attention

    dev = torch.device(device)
    section = "timing"
    print(
        f"\n== 3b. decode attention alone, {DTYPE_NAMES[dtype]}, {iters} calls each, on {dev} ==",
        flush=True,
    )
    if triton_fn is None:
        if not triton_attention.triton_available():
            report.add(section, "kernel timing", "SKIP", "triton is not importable")
            return
        triton_fn = triton_attention.paged_decode_attention_triton
    torch_fn = torch_fn or attention.paged_decode_attention
    for shape in shapes:
        pace = Pace()
        for b in batches:
            name = f"attention {shape.name} B={b}"
            if not pace.fits(deadline, b):
                report.add(section, name, "SKIP", "time budget")
                continue
            t0 = time.monotonic()
            try:
                case = KernelCase(
                    dtype,
                    shape.num_heads,
                    shape.kv_heads,
                    shape.head_dim,
                    shape.block_size,
                    b,
                    shape.ctx,
                )
                rng = random.Random(b)
                jitter = max(0, min(8, shape.ctx // 4))
                lens = [shape.ctx + rng.randint(-jitter, jitter) for _ in range(b)]
                q, k, v, tables, ctx = make_kernel_inputs(case, lens, dev, seed=b)
                scale = shape.head_dim**-0.5
                t_tri = _time_fn(
                    functools.partial(triton_fn, q, k, v, tables, ctx, scale), dev, iters
                )
                t_tor = _time_fn(
                    functools.partial(torch_fn, q, k, v, tables, ctx, scale), dev, iters
                )
                kv_read = sum(lens) * shape.kv_heads * shape.head_dim * 2 * k.element_size()
                report.add(
                    section,
                    name,
                    "INFO",
                    f"triton {t_tri * 1e6:,.1f} us ({kv_read / t_tri / 1e9:.1f} GB/s of KV), "
                    f"torch {t_tor * 1e6:,.1f} us ({kv_read / t_tor / 1e9:.1f} GB/s), "
                    f"triton speedup {t_tor / t_tri:.2f}x (mean ctx {sum(lens) / b:.0f})",
                )
                del q, k, v, tables, ctx
                _free(dev)
            except Exception as e:
                report.add(section, name, "FAIL", f"error: {type(e).__name__}: {e}")
                _free(dev)
            finally:
                pace.record(b, t0)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def build_models(root: Path) -> dict[str, Path]:
    from engine.builtin_model import make_model

    return {p: make_model(root / p, preset=p) for p in ("tiny", "small")}


def run_all(
    device: str | torch.device,
    model_dirs: dict[str, Path],
    *,
    quick: bool = False,
    skip_timing: bool = False,
    budget_s: float = TOTAL_BUDGET_S,
    triton_backend: str = "triton",
    kernel_case_list: Sequence[KernelCase] | None = None,
    timing_batches: Sequence[int] | None = None,
    timing_prompt_len: int = 512,
    timing_shapes: Sequence[AttnShape] | None = None,
    num_prompts: int = NUM_PROMPTS,
    new_tokens: int = NEW_TOKENS,
    equality_config_list: Sequence[EqConfig] | None = None,
) -> Report:
    """Every section under one time budget; the keyword overrides exist for CPU dry runs."""
    budget = Budget(budget_s)
    report = Report()
    timing_keep = 0.0 if skip_timing else 60.0

    configs = equality_config_list or equality_configs(quick, triton_backend)
    check_vs_transformers(
        report,
        device,
        model_dirs,
        configs,
        budget.section(130.0, 30.0 + timing_keep),
        num_prompts,
        new_tokens,
    )

    deadline = budget.section(60.0, timing_keep)
    cases = kernel_case_list
    if cases is None:
        # Short of time after section 1: the reduced set (one block size, batch 1 and 64).
        cases = kernel_cases(quick or deadline.left() < 40.0)
    check_kernel(report, device, cases, deadline)

    if skip_timing:
        return report
    deadline = budget.section(math.inf, 0.0)
    reduced = quick or deadline.left() < 60.0
    batches = timing_batches or ((1, 64) if reduced else (1, 8, 64, 256))
    steps = 10 if reduced else 20
    # Section 3a gets at most two thirds of what is left; 3b the rest.
    part = Deadline(time.monotonic() + deadline.left() * 2 / 3)
    time_decode_steps(
        report,
        device,
        model_dirs["small"],
        batches,
        part,
        prompt_len=timing_prompt_len,
        steps=steps,
    )
    if timing_shapes is None:
        timing_shapes = [
            AttnShape("small-model h8/kv4 d64 bs16", 8, 4, 64, 16, timing_prompt_len + 16),
            AttnShape("llama3-8b h32/kv8 d128 bs16", 32, 8, 128, 16, 2048),
        ]
        if reduced:
            timing_shapes = timing_shapes[:1]
    time_kernels(report, device, timing_shapes, batches, deadline, iters=20 if reduced else 50)
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
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="reduced set: no small/float32/torch equality run, kernel cases at "
        "block size 16 and batch 1/64 up to 2048 tokens, timing at batch 1/64",
    )
    ap.add_argument(
        "--skip-timing", action="store_true", help="correctness sections only (equality and kernel)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=TOTAL_BUDGET_S,
        help=f"time budget for the checks, in seconds (default {TOTAL_BUDGET_S:.0f}); "
        "sections shrink or skip cases to stay within it",
    )
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        build = torch.version.cuda or "no"
        print(
            f"gpu_check: no CUDA GPU found (torch {torch.__version__}, cuda build: {build}); "
            "nothing to check"
        )
        return 0

    t0 = time.monotonic()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    print(f"gpu_check: {torch.cuda.get_device_name(0)}; {_versions()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        model_dirs = build_models(Path(tmp))
        print(f"built the tiny and small models in {time.monotonic() - t0:.1f}s", flush=True)
        budget = args.budget_s - (time.monotonic() - t0)
        report = run_all(
            "cuda", model_dirs, quick=args.quick, skip_timing=args.skip_timing, budget_s=budget
        )
    print(f"\n== summary ({time.monotonic() - t0:.0f}s) ==")
    print(report.table())
    fails = sum(r.status == "FAIL" for r in report.results)
    skips = sum(r.status == "SKIP" for r in report.results)
    passes = sum(r.status == "PASS" for r in report.results)
    skipped = f", {skips} skipped" if skips else ""
    if fails:
        print(f"gpu_check: FAILED: {fails} check(s) failed, {passes} passed{skipped}")
    elif skips:
        print(f"gpu_check: no failures, but not complete: {passes} passed{skipped}")
    else:
        print(f"gpu_check: all {passes} correctness checks passed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
