"""Disaggregation through the async engine's interface alone (kv_layout,
read_kv, write_kv, release), in process: the prompt's KV copied from a
prefill engine's held blocks into a decode engine's reservation gives the
same tokens as one engine, and a copy outside those blocks is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import StepInfo, TokenDelta

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT = list(range(40, 77))  # 37 tokens: three blocks of 16


async def _drain(q: asyncio.Queue[TokenDelta]) -> list[int]:
    tokens: list[int] = []
    while True:
        delta = await asyncio.wait_for(q.get(), 60)
        assert delta.error is None, delta.error
        tokens += delta.token_ids
        if delta.finished is not None:
            return tokens


async def _disaggregated(prefill: LLMEngine, decode: LLMEngine) -> list[int]:
    loop = asyncio.get_running_loop()
    p, d = AsyncEngine(prefill, loop), AsyncEngine(decode, loop)
    assert p.kv_layout == dataclasses.replace(d.kv_layout, num_blocks=p.kv_layout.num_blocks)
    p.start()
    d.start()
    try:
        # Another reservation first, so the two engines' block ids differ.
        assert await d.reserve_remote(d.make_request(PROMPT, PARAMS, "other")) is not None
        reservation = await d.reserve_remote(d.make_request(PROMPT, PARAMS, "r"))
        assert reservation is not None
        table = reservation.to_fill  # nothing cached: the whole prompt
        assert len(table) == d.kv_layout.blocks_for_tokens(len(PROMPT))
        first_params = dataclasses.replace(PARAMS, max_tokens=1)
        req = p.make_request(PROMPT, first_params, "r")
        req.hold_blocks_on_finish = True
        (first,) = await _drain(p.add_request(req))
        for layer in range(p.kv_layout.num_layers):
            key, value = p.read_kv("r", layer)
            d.write_kv(layer, table, key, value)
        p.release("r")
        with pytest.raises(KeyError, match="holds no KV blocks"):
            p.read_kv("r", 0)
        free = [d.kv_layout.num_blocks - 1]  # the free list's last
        with pytest.raises(ValueError, match="reserved for remote KV"):
            d.write_kv(0, free, key[:1], value[:1])
        rest = d.remote_kv_done("r", first, None)
        with pytest.raises(ValueError, match="reserved for remote KV"):  # filled: closed to copies
            d.write_kv(0, table, key, value)
        d.abort("other")
        return [first, *await _drain(rest)]
    finally:
        p.stop()
        d.stop()


def test_kv_through_the_async_engine_equals_one_engine(tiny_llama: Path):
    config = EngineConfig(str(tiny_llama), dtype="float32", kv_cache_bytes=2 << 20)
    one = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
    expected = one.generate([PROMPT], PARAMS, use_tqdm=False)
    prefill = LLMEngine(config)
    decode = LLMEngine(dataclasses.replace(config, kv_cache_bytes=4 << 20))
    assert asyncio.run(_disaggregated(prefill, decode)) == expected[0].token_ids
    for engine in (prefill, decode):
        engine.block_pool.check_integrity()
        assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_build_loads_and_steps_on_one_thread(tiny_llama: Path):
    """AsyncEngine.build makes the LLMEngine on the thread that steps it
    (torch's OpenMP pool is per thread), and a failed build raises in the caller."""
    config = EngineConfig(str(tiny_llama), dtype="float32", kv_cache_bytes=2 << 20)
    threads: dict[str, threading.Thread] = {}

    def make() -> LLMEngine:
        threads["built"] = threading.current_thread()
        return LLMEngine(config)

    def on_step(step: StepInfo) -> None:
        threads.setdefault("stepped", threading.current_thread())

    async def run() -> list[int]:
        aengine = AsyncEngine.build(make, asyncio.get_running_loop(), on_step=on_step)
        aengine.start()
        try:
            return await _drain(aengine.add_request(aengine.make_request(PROMPT, PARAMS, "r")))
        finally:
            aengine.stop()

    assert len(asyncio.run(run())) == PARAMS.max_tokens
    assert threads["built"] is threads["stepped"] is not threading.main_thread()

    def broken() -> LLMEngine:
        return LLMEngine(dataclasses.replace(config, model=str(tiny_llama / "missing")))

    async def fail() -> None:
        AsyncEngine.build(broken, asyncio.get_running_loop())

    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        asyncio.run(fail())
