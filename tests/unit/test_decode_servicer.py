"""The decode servicer's own failure paths, in process over real gRPC: a KV
transport that fails in a way nobody foresaw must end that request (here by
prefilling locally) and free its reservation, never leave the Generate call
waiting forever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from decode_worker.metrics import DecodeMetrics
from decode_worker.options import DecodeOptions
from decode_worker.server import DecodeServicer
from engine import SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.wire import params_to_pb


class BrokenTransport:
    """A KV transport with a bug: it raises what no caller expects."""

    async def fill(self, *args: object) -> None:
        await asyncio.sleep(0.01)
        raise ZeroDivisionError("a bug in the transport")

    async def close(self) -> None:
        pass


async def _serve_and_generate(
    engine: LLMEngine,
) -> tuple[list[int], AsyncEngine, DecodeMetrics]:
    loop = asyncio.get_running_loop()
    aengine = AsyncEngine(engine, loop)
    metrics = DecodeMetrics("decode")
    servicer = DecodeServicer(
        aengine, metrics, "127.0.0.1:0", 0, False, DecodeOptions(), BrokenTransport()
    )
    server = grpc.aio.server()
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    aengine.start()
    await server.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        request = pb.GenerateRequest(
            request_id="broken-1",
            prompt_token_ids=list(range(10, 30)),
            sampling_params=params_to_pb(params),
            prefill_addresses=["127.0.0.1:1"],
        )
        tokens: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(request, timeout=30):
                tokens.extend(msg.token_ids)
        for _ in range(100):  # the abort of the reservation is a queued command
            if aengine.snapshot.kv_blocks_free == aengine.snapshot.kv_blocks_total:
                break
            await asyncio.sleep(0.05)
        return tokens, aengine, metrics
    finally:
        await server.stop(grace=None)
        aengine.stop()


def test_an_unexpected_transport_error_ends_in_a_local_prefill(tiny_llama: Path):
    engine = LLMEngine(EngineConfig(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20))
    tokens, aengine, metrics = asyncio.run(_serve_and_generate(engine))
    assert len(tokens) == 6  # prefilled here: before the fix the call hung until its deadline
    snap = aengine.snapshot
    assert snap.kv_blocks_free == snap.kv_blocks_total and snap.awaiting_kv == 0
    engine.block_pool.check_integrity()
    assert metrics.local_prefills._value.get() == 1
