"""The engine loop: schedule, run, post-process. Every worker role runs this."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from engine import sampler
from engine.block_pool import BlockPool
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.kv_access import KvReservation
from engine.model.loader import weight_files
from engine.model_runner import ModelRunner
from engine.outputs import EngineSnapshot, RequestOutput, StepResult
from engine.request import Request, RequestStatus
from engine.sampling_params import GuidedSpec, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.structured_output import CompiledGrammar, StructuredOutputCompiler, validate_spec

log = logging.getLogger("splitserve")


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        weight_files(self.model_config.path)  # fail on missing weights before anything loads
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model)
        self.eos_token_ids = self._eos_ids()
        self.runner = ModelRunner(config, self.model_config, self.eos_token_ids)
        self.block_pool = BlockPool(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_num_batched_tokens,
                self.max_model_len,
                # vLLM's watermark: 1% of the pool stays free of reservations.
                reservation_watermark=max(1, self.block_pool.num_blocks // 100),
            ),
            self.block_pool,
        )
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self._grammars: StructuredOutputCompiler | None = None  # made at the first guided request
        self._grammars_lock = threading.Lock()
        self._log_capacity()

    def compile_grammar(self, spec: GuidedSpec) -> Future[CompiledGrammar]:
        """The spec compiled for this engine's tokenizer and vocabulary, on the
        compiler's thread (cached by spec); ValueError at once for a spec
        the grammar library refuses. Any thread may call it."""
        validate_spec(spec)
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = StructuredOutputCompiler(
                    self.tokenizer,
                    vocab_size=self.model_config.vocab_size,
                    stop_token_ids=self.eos_token_ids,
                )
        return self._grammars.compile(spec)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(self.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int) and tok_eos not in ids:
            ids.append(tok_eos)
        return tuple(ids)

    def _log_capacity(self) -> None:
        blocks, bs = self.block_pool.num_blocks, self.config.block_size
        per_seq = self.block_pool.blocks_for_tokens(self.max_model_len)
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB); %.1f sequences of "
            "max_model_len %d fit at once",
            blocks,
            bs,
            blocks * bs,
            self.config.kv_cache_bytes / 2**20,
            blocks / per_seq,
            self.max_model_len,
        )

    # -- requests ----------------------------------------------------------------

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Tokenize and validate, without queueing (so a batch can be checked whole)."""
        vocab = self.model_config.vocab_size
        bad_bias = [t for t, _ in params.logit_bias if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {bad_bias[:5]}")
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text = None
            ids = list(prompt)
            bad = [
                t
                for t in ids
                if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size
            ]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {self.model_config.vocab_size}); "
                    f"got {bad[:5]}"
                )
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context length is {self.max_model_len}, "
                "which leaves no room to generate"
            )
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if self.block_pool.blocks_for_tokens(longest) > self.block_pool.num_blocks:
            raise ValueError(
                f"the request may reach {longest} tokens but the whole KV cache holds "
                f"{self.block_pool.num_blocks * self.config.block_size}; raise kv_cache_bytes "
                "or lower max_tokens"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, params, prompt=text)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        if params.structured_output is not None:
            req.grammar = self.compile_grammar(params.structured_output)
        return req

    def add_request(self, request: Request) -> None:
        """Queue a request. Output tokens it already carries (a request
        migrated from a failed worker, or whose remote prefill failed after
        its first token) are recomputed with the prompt, as after a
        preemption; sampling goes on after them as if they were drawn here."""
        resumed = request.output_token_ids
        if resumed and len(resumed) >= request.sampling_params.max_tokens:
            raise ValueError(
                f"{len(resumed)} tokens already generated; max_tokens is "
                f"{request.sampling_params.max_tokens}"
            )
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"{request.num_tokens} tokens already known; the context length is "
                f"{self.max_model_len}"
            )
        if resumed:
            # The client got the prompt logprobs with the first token.
            request.prompt_logprobs = None
        if request.sampling_params.logprobs is not None:
            # Placeholders for tokens the client already has (never sent
            # again) keep output_logprobs aligned with output_token_ids.
            missing = len(resumed) - len(request.output_logprobs)
            request.output_logprobs.extend([0.0] * missing)
        self.scheduler.add_request(request)
        for _ in resumed:  # seeded streams go on where they were
            sampler.skip_sample(request, self.model_config.vocab_size, self.runner.device)
        if request.sampling_params.stop:
            detok = self._detok[request.request_id] = IncrementalDetokenizer(self.tokenizer)
            for token in resumed:
                detok.push(token)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort_request(request_id)
        if req is None:
            return None
        return self._finalize(req, time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop --------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether a step could run something now (waiting or running requests)."""
        return self.scheduler.has_schedulable()

    def step(self) -> list[RequestOutput]:
        """One iteration: returns the requests that finished in it."""
        return self.run_step().finished

    def run_step(self) -> StepResult:
        """One iteration, and what it did."""
        # Before scheduling: a grammar may finish compiling meanwhile.
        schedulable = self.scheduler.has_schedulable()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            # Nothing to run is fine only while blocks are pinned by events
            # from outside (KV arriving, held KV being acknowledged): those
            # end in bounded time. Otherwise the scheduler broke its invariant.
            if schedulable and not self.scheduler.num_pinned_blocks:
                raise AssertionError(
                    f"scheduler made no progress with nothing pinned: {self.block_pool}, "
                    f"{len(self.scheduler.waiting)} waiting"
                )
            return StepResult([], 0, {})
        samples = self.runner.execute(sched.scheduled)
        now = time.monotonic()
        for s, sample in zip(sched.scheduled, samples, strict=True):
            if sample is not None and s.request.first_token_time is None:
                s.request.first_token_time = now
        finished = self.scheduler.update(sched, samples, self.eos_token_ids)
        for s, sample in zip(sched.scheduled, samples, strict=True):
            if sample is not None and self._stop_string_hit(s.request, sample[0]):
                finished.append(s.request)
        held = {
            req.request_id: list(self.block_pool.block_table(req.request_id))
            for req in finished
            if req.request_id in self.scheduler.held
        }
        outputs = [self._finalize(req, now) for req in finished]
        return StepResult(outputs, len(sched.scheduled), held)

    def snapshot(self) -> EngineSnapshot:
        """The engine's load now."""
        sched, pool = self.scheduler, self.block_pool
        return EngineSnapshot(
            kv_blocks_total=pool.num_blocks,
            kv_blocks_free=pool.num_free_blocks,
            running=len(sched.running),
            waiting=len(sched.waiting),
            waiting_prompt_tokens=sum(
                max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in sched.waiting
            ),
            awaiting_kv=len(sched.awaiting_kv),
            held=len(sched.held),
            num_steps=sched.stats.num_steps,
            mean_batch_size=sched.stats.mean_running,
            num_preemptions=sched.stats.num_preemptions,
            prefix_queries=sched.stats.prefix_queries,
            prefix_hits=sched.stats.prefix_hits,
        )

    def _stop_string_hit(self, req: Request, token: int) -> bool:
        """Feed the token to the request's stop-string detokenizer; True if a
        stop string ends a request that was still running."""
        detok = self._detok.get(req.request_id)
        if detok is None:
            return False
        new = detok.push(token)
        # A token that ended the request by EOS or a stop token adds no text
        # worth matching; one that hit max_tokens still may.
        if not new or req.status is RequestStatus.FINISHED_STOPPED:
            return False
        if req.num_output_tokens <= req.sampling_params.min_tokens:
            return False  # as EOS, a stop string cannot end it before min_tokens
        hit = find_stop(detok.text, len(new), req.sampling_params.stop)
        if hit is None:
            return False
        detok.text = detok.text[: hit[0]]
        req.stop_reason = hit[1]
        finished_already = req.is_finished  # by max_tokens, in this same step
        self.scheduler.stop_by_string(req)
        return not finished_already

    # -- disaggregation: the prompt's KV computed by another engine -------------

    def reserve_remote(self, request: Request) -> KvReservation | None:
        """Decode role: reserve blocks for the prompt's KV before it is computed
        elsewhere, starting from the prefix this engine already has cached;
        None when full."""
        cached = self.scheduler.reserve_for_remote_kv(request)
        if cached is None:
            return None
        if request.sampling_params.stop:
            self._detok[request.request_id] = IncrementalDetokenizer(self.tokenizer)
        # The prompt's blocks; the rest is the first decode step's room.
        n = self.block_pool.blocks_for_tokens(request.num_prompt_tokens)
        table = self.block_pool.block_table(request.request_id)[:n]
        return KvReservation(tuple(table), cached)

    def remote_kv_done(
        self,
        request_id: str,
        first_token: int,
        logprob: float | None = None,
        kv_valid: bool = True,
    ) -> RequestOutput | None:
        """All layers are written and the prefill side sampled `first_token`:
        the request joins the running batch at the next step. Returns its
        output if that token already finishes it. With kv_valid False (the KV
        never fully arrived) its blocks are dropped and the prompt is
        recomputed here, the first token counted as generated."""
        req = self.scheduler.awaiting_kv.get(request_id)
        if req is None:
            raise KeyError(f"no reservation awaiting KV for request {request_id!r}")
        now = time.monotonic()
        req.first_token_time = now
        # Scored by the engine that computed the prompt, and sent with the
        # first token (a prompt recomputed here, kv_valid False, is not rescored).
        req.prompt_logprobs = None
        sampler.skip_sample(req, self.model_config.vocab_size, self.runner.device)
        done = self.scheduler.remote_kv_arrived(
            request_id, first_token, logprob, self.eos_token_ids, kv_valid
        )
        if self._stop_string_hit(req, first_token) or done is not None:
            return self._finalize(req, now)
        return None

    def release_blocks(self, request_id: str) -> None:
        """Prefill role: the KV has reached its receiver; free the blocks."""
        self.scheduler.release_blocks(request_id)

    def _finalize(self, req: Request, now: float) -> RequestOutput:
        req.finish_time = now
        detok = self._detok.pop(req.request_id, None)
        if detok is not None and isinstance(req.stop_reason, str):
            text = detok.text  # cut before the stop string
        else:
            text = str(self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True))
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            text=text,
            token_ids=list(req.output_token_ids),
            finish_reason=req.status.value,
            stop_reason=req.stop_reason,
            logprobs=list(req.output_logprobs)
            if req.sampling_params.logprobs is not None
            else None,
            num_preemptions=req.num_preemptions,
            num_cached_tokens=req.num_cached_tokens,
            prompt_logprobs=req.scored_prompt,
            arrival_time=req.arrival_time,
            scheduled_time=req.scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=now,
        )


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad or missing tokenizer
        raise ValueError(
            f"could not load a tokenizer from {path} (expected tokenizer.json or the "
            f"tokenizer files of the model): {e}"
        ) from e
