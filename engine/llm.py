"""The offline API, in vLLM's shape: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from engine.config import EngineConfig, engine_default
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("splitserve")

Prompt = str | Sequence[int]


class LLM:
    """A paged, continuously batched engine over a local Hugging Face model.

    model: a model directory; None builds (once) and uses the built-in default.
    dtype: "float32", "bfloat16", "float16" or "auto": on CPU bfloat16 where
        the CPU runs it natively (AMX or AVX512-BF16), else float32; on GPU
        the checkpoint's dtype (float16 for bfloat16 on a GPU without it).
        The choice and its reason are logged (engine/dtype_choice.py).
    kv_cache_bytes: memory for the KV cache; it sets how many blocks exist.
    block_size: tokens per KV block (a power of two).
    max_num_seqs: the most requests in the running batch.
    max_num_batched_tokens: the token budget of one step (prefill chunks
        and decode tokens together).
    max_model_len: the context length (default: the model's).
    attention_backend, linear_backend: the kernels (EngineConfig says which
        "auto" picks); for side-by-side measurements.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        kv_cache_bytes: int = engine_default("kv_cache_bytes"),
        block_size: int = engine_default("block_size"),
        max_num_seqs: int = engine_default("max_num_seqs"),
        max_num_batched_tokens: int = engine_default("max_num_batched_tokens"),
        max_model_len: int | None = None,
        device: str = "auto",
        attention_backend: str = "auto",
        linear_backend: str = "auto",
        enable_prefix_caching: bool = engine_default("enable_prefix_caching"),
    ) -> None:
        if model is None:
            from modelmaker import ensure_default_model

            model = str(ensure_default_model())
        self.engine = LLMEngine(
            EngineConfig(
                model=str(model),
                dtype=dtype,
                device=device,
                block_size=block_size,
                kv_cache_bytes=kv_cache_bytes,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                attention_backend=attention_backend,
                linear_backend=linear_backend,
                enable_prefix_caching=enable_prefix_caching,
            )
        )
        log.info("dtype: %s", self.engine.config.dtype_choice(self.engine.model_config).describe())

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt at once; outputs come back in prompt order.

        A prompt is a string or a list of token ids. `sampling_params` is one
        SamplingParams for all prompts or one per prompt.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts"
                )
        engine = self.engine
        # Validate every prompt before queueing any, so a bad one leaves no trace.
        requests = []
        for i, (p, sp) in enumerate(zip(prompt_list, params_list, strict=True)):
            try:
                requests.append(engine.make_request(p, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for r in requests:
            engine.add_request(r)
        index = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        # None lets tqdm decide: a bar on a terminal, nothing in logs and pipes.
        bar = tqdm(
            total=len(requests),
            desc="generate",
            unit="req",
            disable=True if not use_tqdm or len(requests) < 2 else None,
            leave=False,
        )
        remaining = len(requests)
        try:
            while remaining and engine.has_unfinished_requests():
                for out in engine.step():
                    results[index[out.request_id]] = out
                    remaining -= 1
                    bar.update(1)
        finally:
            bar.close()
            # An exception (or Ctrl-C) mid-batch must not leave requests holding blocks.
            for r in requests:
                if not r.is_finished:
                    engine.abort_request(r.request_id)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    for p in items:
        if not isinstance(p, str) and not (
            isinstance(p, Sequence) and all(isinstance(t, int) for t in p)
        ):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p)}")
    return items  # type: ignore[return-value]
