"""The model runner: owns the weights and the KV-cache tensors, turns a
scheduled batch into tensors, runs the forward pass, samples.

It makes no scheduling decision: it reads each scheduled request's tokens,
start position and block table, and returns one sample (or None, for a
prefill chunk that does not reach the end of the known tokens) per request.
For a request that asks for prompt logprobs it also scores the prompt
positions each chunk computes, appending them to `Request.prompt_logprobs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine import sampler, structured_output
from engine.config import EngineConfig, ModelConfig
from engine.model.llama import AttentionBatch, DecodeAttentionFn, PrefillChunk
from engine.model.loader import load_model
from engine.outputs import TokenLogprob
from engine.request import Request
from engine.scheduler import ScheduledRequest

log = logging.getLogger("splitserve")

# Prompt positions scored per logits call: bounds the [rows, vocab] float32
# logits a long prompt chunk materializes (128 MiB at a 128k vocabulary).
PROMPT_SCORE_ROWS = 256


@dataclass(slots=True)
class StepTimings:
    """Seconds spent in this runner, summed over steps: preparing input
    tensors, the model's forward pass (with logits), and sampling."""

    prepare_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0


class ModelRunner:
    def __init__(
        self,
        engine_config: EngineConfig,
        model_config: ModelConfig,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.device = engine_config.torch_device
        # The sampler keeps them out of reach of requests short of min_tokens.
        self.eos_token_ids = tuple(eos_token_ids)
        self.dtype = engine_config.torch_dtype(model_config)
        self.block_size = engine_config.block_size
        self.max_model_len = engine_config.resolved_max_model_len(model_config)
        self.model = load_model(model_config, self.dtype, self.device, self.max_model_len)
        self.model.decode_attention = self._pick_decode_attention(engine_config.attention_backend)
        self.linear_backend = self._pack_linears(engine_config.linear_backend)
        self.num_blocks = engine_config.num_kv_blocks(model_config)
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={engine_config.kv_cache_bytes} is too small for one KV block "
                f"({engine_config.kv_block_bytes(model_config)} bytes)"
            )
        # Allocated and touched once: first touch of fresh pages is ~30x slower
        # than a warm copy on these machines, so never allocate per request.
        shape = (self.num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(model_config.num_layers)
        ]
        self.timings = StepTimings()

    def read_blocks(
        self, layer: int, block_ids: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of the given blocks: [n, block_size, kv_heads, head_dim]."""
        idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        k_cache, v_cache = self.kv_caches[layer]
        return k_cache[idx], v_cache[idx]

    def write_blocks(
        self, layer: int, block_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write K and V ([n, block_size, kv_heads, head_dim]) into the given blocks."""
        k_cache, v_cache = self.kv_caches[layer]
        expected = (len(block_ids), *k_cache.shape[1:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV of shape {tuple(k.shape)}/{tuple(v.shape)}, expected {expected}")
        idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        k_cache.index_copy_(0, idx, k.to(device=self.device, dtype=k_cache.dtype))
        v_cache.index_copy_(0, idx, v.to(device=self.device, dtype=v_cache.dtype))

    def _pack_linears(self, backend: str) -> str:
        """Pack the linear layers' weights for oneDNN where that is the faster
        GEMM (CPU: float32, or bfloat16 on a CPU with bfloat16 instructions);
        the backend the layers run on."""
        from engine.model import packed_linear

        usable = packed_linear.onednn_available(self.dtype, self.device)
        if backend == "onednn" and not usable:
            raise ValueError(
                "linear_backend='onednn' needs a CPU device with oneDNN, and float32 or "
                "bfloat16 on a CPU with bfloat16 instructions (AMX/AVX512-BF16)"
            )
        if backend == "torch" or not usable:
            return "torch"
        packed_linear.pack_linears(self.model)
        return "onednn"

    def _pick_decode_attention(self, backend: str) -> DecodeAttentionFn:
        """The decode-attention function: the Triton kernel on CUDA, the C
        kernel on CPU (float32/bfloat16), the PyTorch path otherwise or when
        asked for."""
        from engine import attention

        if backend == "auto":
            if self.device.type == "cuda":
                backend = "triton"
            elif self.dtype in (torch.float32, torch.bfloat16):
                backend = "cpu"
            else:
                backend = "torch"
        if backend == "triton":
            from engine import triton_attention

            if triton_attention.triton_available():
                return triton_attention.paged_decode_attention_triton
            log.warning("triton is not installed: decode attention uses the PyTorch path")
        elif backend == "cpu":
            from engine import cpu_kernels

            if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError("attention_backend='cpu' needs a CPU device and float32/bfloat16")
            if cpu_kernels.available():
                return cpu_kernels.paged_decode_attention_cpu
        return attention.paged_decode_attention

    @torch.inference_mode()
    def execute(
        self, scheduled: Sequence[ScheduledRequest]
    ) -> list[tuple[int, float | None] | None]:
        t0 = time.perf_counter()
        inputs = self._prepare(scheduled)
        t1 = time.perf_counter()
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches)
        results: list[tuple[int, float | None] | None] = [None] * len(scheduled)
        t2 = t3 = time.perf_counter()
        if inputs.prompt_spans:
            self._score_prompts(hidden, scheduled, inputs.prompt_spans)
        if inputs.sampled:
            logits = self.model.compute_logits(hidden[inputs.logit_rows])
            t2 = time.perf_counter()
            reqs = [scheduled[i].request for i in inputs.sampled]
            guided = [j for j, r in enumerate(reqs) if r.grammar is not None]
            if guided:
                _mask_by_grammar(logits, reqs, guided)
            samples = sampler.sample(logits, reqs, self.eos_token_ids)
            for i, sample in zip(inputs.sampled, samples, strict=True):
                results[i] = sample
            for j in guided:
                _advance_grammar(reqs[j], samples[j][0])
            t3 = time.perf_counter()
        self.timings.prepare_s += t1 - t0
        self.timings.forward_s += t2 - t1
        self.timings.sample_s += t3 - t2
        return results

    def _score_prompts(
        self,
        hidden: torch.Tensor,  # [N, hidden_size], one row per input token
        scheduled: Sequence[ScheduledRequest],
        spans: list[tuple[int, int, int]],
    ) -> None:
        """Append to each spanned request's prompt_logprobs the entries its
        rows give: row at prompt position p scores prompt token p + 1 (the
        raw log-softmax in float32, as the sampler's logprobs)."""
        for i, row, count in spans:
            req = scheduled[i].request
            lps = req.prompt_logprobs
            assert lps is not None
            first = len(lps)  # the prompt token the span's first row scores
            n_top = req.sampling_params.prompt_logprobs or 0
            dev = hidden.device
            for a in range(0, count, PROMPT_SCORE_ROWS):
                b = min(count, a + PROMPT_SCORE_ROWS)
                logits = self.model.compute_logits(hidden[row + a : row + b])
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # [b - a, vocab]
                targets = req.prompt_token_ids[first + a : first + b]
                target_t = torch.tensor(targets, dtype=torch.long, device=dev)
                chosen: list[float] = logprobs.gather(1, target_t[:, None]).squeeze(1).tolist()
                if not n_top:
                    lps.extend(chosen)
                    continue
                values, ids = torch.topk(logprobs, min(n_top, logprobs.shape[1]), dim=-1)
                value_rows: list[list[float]] = values.tolist()
                id_rows: list[list[int]] = ids.tolist()
                for lp, top_ids, top_lps in zip(chosen, id_rows, value_rows, strict=True):
                    lps.append(TokenLogprob(lp, list(zip(top_ids, top_lps, strict=True))))

    def _prepare(self, scheduled: Sequence[ScheduledRequest]) -> _StepInputs:
        # Decode rows (one new token) first, prefill chunks after: the model
        # runs all decode rows through one batched attention call.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        decode_tables: list[Sequence[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logit_rows: list[int] = []
        sampled: list[int] = []
        prompt_spans: list[tuple[int, int, int]] = []
        for i in order:
            s = scheduled[i]
            req, n, table = s.request, s.num_new_tokens, s.block_table
            start = req.num_computed_tokens
            flat_start = len(input_ids)
            input_ids += req.token_ids_slice(start, start + n)
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                table_t = torch.tensor(table, dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(flat_start, n, start, table_t))
            if s.completes_known_tokens:
                logit_rows.append(flat_start + n - 1)
                sampled.append(i)
            if req.prompt_logprobs_pending:
                span = _prompt_span(req, start, n)
                if span is not None:
                    prompt_spans.append((i, flat_start + span[0], span[1]))

        dev = self.device
        num_decode = len(decode_lens)
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=num_decode,
            decode_block_tables=_pad_tables(decode_tables, dev) if num_decode else None,
            decode_context_lens=(
                torch.tensor(decode_lens, dtype=torch.long, device=dev) if num_decode else None
            ),
            prefills=prefills,
        )
        return _StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            batch=batch,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            sampled=sampled,
            prompt_spans=prompt_spans,
        )


@dataclass(slots=True)
class _StepInputs:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    batch: AttentionBatch
    logit_rows: torch.Tensor  # flat index of each token whose logits are sampled
    sampled: list[int]  # the scheduled entry each logit row belongs to
    # Prompt positions to score: (scheduled entry, its first flat row, rows).
    prompt_spans: list[tuple[int, int, int]]


def _prompt_span(req: Request, start: int, n: int) -> tuple[int, int] | None:
    """Of a chunk computing positions [start, start + n), the rows that score
    prompt tokens not scored yet, as (offset in the chunk, count); None if
    none. Position p scores token p + 1, so the prompt's last position (its
    logits give the first output token) scores none. Positions scored
    before (a chunk recomputed after a preemption) are not scored again."""
    assert req.prompt_logprobs is not None
    lo = len(req.prompt_logprobs) - 1  # the first position whose entry is missing
    hi = min(start + n, req.num_prompt_tokens - 1)
    if start > lo or hi <= lo:
        # start > lo: the chunk begins past a position never scored (only a
        # prompt started from cached KV could); the scheduler prevents it.
        return None
    return lo - start, hi - lo


def _pad_tables(tables: list[Sequence[int]], device: torch.device) -> torch.Tensor:
    # Padding points at block 0: those slots lie past each row's context
    # length and are masked out, so any valid block id will do.
    width = max(len(t) for t in tables)
    return torch.tensor(
        [list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device
    )


def _mask_by_grammar(logits: torch.Tensor, reqs: Sequence[Request], rows: list[int]) -> None:
    """Forbid, in the given rows, the tokens their requests' grammars do not
    allow next (before any other logit processing, as vLLM does: logprobs see
    the mask). A request's matcher is made at its first sampling here, from
    the tokens it already has (a decode worker taking over after the prefill
    worker's first token, a migrated request)."""
    matchers = []
    for j in rows:
        req = reqs[j]
        if req.matcher is None:
            assert req.grammar is not None and req.grammar.done(), "admitted before compiled"
            req.matcher = req.grammar.result().matcher(req.output_token_ids)
        matchers.append(req.matcher)
    structured_output.apply_token_masks(logits, rows, matchers)


def _advance_grammar(req: Request, token: int) -> None:
    if not req.matcher.accept(token):
        # Only a token the mask allowed can be sampled: a bug if it happens.
        log.error("request %s: sampled token %d breaks its grammar", req.request_id, token)
