"""Both servicers in one process, over real gRPC on 127.0.0.1: a prefill
servicer and a decode servicer, each on its own AsyncEngine. The
disaggregated stream equals one engine's output token for token, and every
block on both sides is back when the calls end; a draining prefill worker
refuses new prompts and the decode servicer then prefills locally."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from decode_worker.metrics import DecodeMetrics
from decode_worker.options import DecodeOptions
from decode_worker.server import DecodeServicer
from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from kvtransfer.grpc_backend import GrpcPrefill
from kvtransfer.peers import KnownPeers
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.server import PrefillServicer
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.wire import params_to_pb

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(10, 60)), list(range(200, 217)), [9] * 33]


def engine(model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(str(model), dtype="float32", kv_cache_bytes=4 << 20))


@dataclass
class Pair:
    prefill: PrefillServicer
    decode: DecodeServicer
    p_engine: AsyncEngine
    d_engine: AsyncEngine
    d_metrics: DecodeMetrics
    prefill_address: str
    decode_address: str


@asynccontextmanager
async def serving(model: Path) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    p_engine, d_engine = AsyncEngine(engine(model), loop), AsyncEngine(engine(model), loop)
    p_server, d_server = grpc.aio.server(), grpc.aio.server()
    p_port = p_server.add_insecure_port("127.0.0.1:0")
    d_port = d_server.add_insecure_port("127.0.0.1:0")
    prefill_address, decode_address = f"127.0.0.1:{p_port}", f"127.0.0.1:{d_port}"
    prefill = PrefillServicer(p_engine, PrefillMetrics(), prefill_address, 0)
    d_metrics = DecodeMetrics("decode")
    transport = GrpcPrefill(known=KnownPeers(static=[prefill_address]))
    decode = DecodeServicer(
        d_engine, d_metrics, decode_address, 0, False, DecodeOptions(), transport
    )
    pb_grpc.add_PrefillWorkerServicer_to_server(prefill, p_server)
    pb_grpc.add_DecodeWorkerServicer_to_server(decode, d_server)
    for e in (p_engine, d_engine):
        e.start()
    await p_server.start()
    await d_server.start()
    try:
        yield Pair(prefill, decode, p_engine, d_engine, d_metrics, prefill_address, decode_address)
    finally:
        await d_server.stop(grace=None)
        await p_server.stop(grace=None)
        await transport.close()
        for e in (p_engine, d_engine):
            e.stop()


async def generate(pair: Pair, rid: str, prompt: list[int]) -> list[int]:
    return (await generate_timed(pair, rid, prompt))[0]


async def generate_timed(pair: Pair, rid: str, prompt: list[int]) -> tuple[list[int], pb.Timings]:
    """The tokens, and the final message's timings."""
    request = pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling_params=params_to_pb(PARAMS),
        prefill_addresses=[pair.prefill_address],
    )
    tokens: list[int] = []
    timings = pb.Timings()
    async with grpc.aio.insecure_channel(pair.decode_address) as ch:
        async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(request, timeout=60):
            tokens.extend(msg.token_ids)
            if msg.finish_reason:
                timings = msg.timings
    return tokens, timings


async def all_blocks_back(*engines: AsyncEngine) -> bool:
    """Frees are queued commands: wait (bounded) for every block to return."""
    for _ in range(200):
        snaps = [e.snapshot for e in engines]
        if all(s.kv_blocks_free == s.kv_blocks_total for s in snaps):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> list[list[int]]:
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_disaggregated_streams_equal_one_engine_and_free_every_block(tiny_llama, expected):
    async def run() -> tuple[list[list[int]], bool, float]:
        async with serving(tiny_llama) as pair:
            got = await asyncio.gather(*(generate(pair, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            clean = await all_blocks_back(pair.p_engine, pair.d_engine)
            return list(got), clean, pair.d_metrics.local_prefills._value.get()

    got, clean, local_prefills = asyncio.run(run())
    assert got == expected
    assert clean, "a block stayed allocated after every call ended"
    assert local_prefills == 0  # the KV came from the prefill servicer


def test_a_draining_prefill_worker_is_skipped_and_the_prompt_prefilled_here(tiny_llama, expected):
    async def run() -> tuple[list[int], bool, float]:
        async with serving(tiny_llama) as pair:
            pair.prefill.draining = True
            tokens = await generate(pair, "drained-1", PROMPTS[0])
            clean = await all_blocks_back(pair.p_engine, pair.d_engine)
            return tokens, clean, pair.d_metrics.local_prefills._value.get()

    tokens, clean, local_prefills = asyncio.run(run())
    assert tokens == expected[0]
    assert clean
    assert local_prefills == 1


def test_the_decode_worker_receives_only_the_blocks_its_prefix_cache_lacks(tiny_llama):
    """A prompt whose prefix the decode worker computed before (it received
    that KV for an earlier request) reserves those blocks from its cache; the
    prefill worker sends only the rest, and the output is unchanged."""
    shared = list(range(100, 164))  # 4 full blocks of 16
    first, second = [*shared, 7, 8, 9], [*shared, *range(300, 340)]
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
    want = [o.token_ids for o in llm.generate([first, second], PARAMS, use_tqdm=False)]

    async def run() -> tuple[list[tuple[list[int], pb.Timings]], int, bool]:
        async with serving(tiny_llama) as pair:
            a = await generate_timed(pair, "a", first)
            b = await generate_timed(pair, "b", second)
            layout = pair.d_engine.kv_layout
            block_bytes = 2 * layout.num_layers * layout.dtype.itemsize
            block_bytes *= layout.block_size * layout.num_kv_heads * layout.head_dim
            clean = await all_blocks_back(pair.p_engine, pair.d_engine)
            return [a, b], block_bytes, clean

    (a, b), block_bytes, clean = asyncio.run(run())
    assert [a[0], b[0]] == want
    assert a[1].decode_cached_tokens == 0
    assert a[1].kv_transfer_bytes == 5 * block_bytes  # 67 tokens: 5 blocks
    assert b[1].decode_cached_tokens == 64
    assert b[1].kv_transfer_bytes == 3 * block_bytes  # 104 tokens: 7 blocks, 4 held
    assert b[1].num_cached_tokens == 64  # the prefill worker's cache, too
    assert clean


def test_top_logprobs_cross_the_wire_as_one_engine_computes_them(tiny_llama):
    """logprobs = 3, disaggregated: the first token's alternatives come from
    the prefill worker (FirstToken), the rest from the decode engine; one
    TopLogprobs per token, equal to the offline engine's."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
    want = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]

    async def run() -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
        async with serving(tiny_llama) as pair:
            request = pb.GenerateRequest(
                request_id="top",
                prompt_token_ids=PROMPTS[1],
                sampling_params=params_to_pb(params),
                prefill_addresses=[pair.prefill_address],
            )
            tokens: list[int] = []
            logprobs: list[float] = []
            tops: list[list[tuple[int, float]]] = []
            async with grpc.aio.insecure_channel(pair.decode_address) as ch:
                async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(request, timeout=60):
                    assert len(msg.top_logprobs) == len(msg.token_ids)
                    tokens.extend(msg.token_ids)
                    logprobs.extend(msg.logprobs)
                    tops += [
                        list(zip(t.token_ids, t.logprobs, strict=True)) for t in msg.top_logprobs
                    ]
            return tokens, logprobs, tops

    tokens, logprobs, tops = asyncio.run(run())
    assert tokens == want.token_ids
    assert want.logprobs is not None and want.top_logprobs is not None
    assert logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert [[t for t, _ in top] for top in tops] == [
        [t for t, _ in top] for top in want.top_logprobs
    ]
    for got, ref in zip(tops, want.top_logprobs, strict=True):
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in ref], abs=1e-5)


def test_prompt_logprobs_come_with_the_first_token_from_whoever_prefills(tiny_llama):
    """prompt_logprobs = 2: the prefill worker scores the whole prompt (even
    cached on both sides by an earlier request) and the decode worker
    forwards it in the first message; a decode worker that prefills locally
    scores it itself; a migrated (resumed) request sends none. All equal
    the offline engine's."""
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
    want = llm.generate([prompt], params, use_tqdm=False)[0]
    assert want.prompt_logprobs is not None and want.prompt_top_logprobs is not None

    async def stream(
        pair: Pair, rid: str, resume: tuple[int, ...] = ()
    ) -> list[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling_params=params_to_pb(params),
            prefill_addresses=[pair.prefill_address],
            resume_token_ids=resume,
        )
        async with grpc.aio.insecure_channel(pair.decode_address) as ch:
            return [msg async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(request, timeout=60)]

    async def run() -> tuple[list[list[pb.GenerateResponse]], float, bool]:
        async with serving(tiny_llama) as pair:
            await generate(pair, "warm", prompt)  # the prompt is cached on P and D now
            remote = await stream(pair, "remote")
            pair.prefill.draining = True
            local = await stream(pair, "local")
            resumed = await stream(pair, "resumed", tuple(want.token_ids[:2]))
            clean = await all_blocks_back(pair.p_engine, pair.d_engine)
            return [remote, local, resumed], pair.d_metrics.local_prefills._value.get(), clean

    (remote, local, resumed), local_prefills, clean = asyncio.run(run())
    assert local_prefills == 1 and clean
    assert remote[-1].timings.decode_cached_tokens > 0  # D reserved from its cache
    assert remote[-1].timings.num_cached_tokens == 0  # P computed every position
    for msgs in (remote, local):
        assert [t for m in msgs for t in m.token_ids] == want.token_ids
        assert msgs[0].HasField("prompt_logprobs")
        assert not any(m.HasField("prompt_logprobs") for m in msgs[1:])
        got = msgs[0].prompt_logprobs
        assert list(got.logprobs) == pytest.approx(want.prompt_logprobs[1:], abs=1e-5)
        tops = [list(zip(t.token_ids, t.logprobs, strict=True)) for t in got.top_logprobs]
        for g, w in zip(tops, want.prompt_top_logprobs[1:], strict=True):
            assert [t for t, _ in g] == [t for t, _ in w]
            assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-5)
    assert [t for m in resumed for t in m.token_ids] == want.token_ids[2:]
    assert not any(m.HasField("prompt_logprobs") for m in resumed)
