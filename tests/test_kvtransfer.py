"""KV transfer: chunking, the wire codec, and the receiver's guard on
reservations, against a real engine's KV pool."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from engine import LLM, SamplingParams
from kvtransfer import KvChunk, KvReceiver, KvRejected, KvSender, TransferStats, send_kv
from kvtransfer.base import split_layer
from kvtransfer.grpc_backend import chunk_from_proto, chunk_to_proto

BLOCK = (16, 2, 8)  # block_size, kv_heads, head_dim


def layer_kv(n_blocks: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    v = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    return k, v


class PoolWrites:
    """A real KV pool (one tensor per layer) that the receiver writes into."""

    def __init__(self, num_layers: int, num_blocks: int, dtype=torch.bfloat16):
        self.k = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]

    def write(self, layer, block_ids, k, v):
        idx = torch.tensor(list(block_ids))
        self.k[layer].index_copy_(0, idx, k)
        self.v[layer].index_copy_(0, idx, v)


def test_split_layer_respects_the_chunk_cap_and_keeps_whole_blocks():
    k, v = layer_kv(10, 0)
    per_block = 2 * k[0].nbytes
    chunks = split_layer("r", 3, list(range(100, 110)), k, v, max_chunk_bytes=3 * per_block + 1)
    assert [len(c.block_ids) for c in chunks] == [3, 3, 3, 1]
    assert all(c.nbytes <= 3 * per_block + 1 for c in chunks)
    assert torch.equal(torch.cat([c.key for c in chunks]), k)
    assert [b for c in chunks for b in c.block_ids] == list(range(100, 110))
    # A cap below one block still moves one block per chunk.
    assert len(split_layer("r", 0, list(range(10)), k, v, max_chunk_bytes=1)) == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codec_round_trip_is_exact(dtype):
    k, v = layer_kv(3, 1, dtype)
    chunk = KvChunk("req-1", 2, (7, 3, 9), k, v)
    msg = chunk_to_proto(chunk)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [3, *BLOCK]
    back = chunk_from_proto(type(msg).FromString(msg.SerializeToString()))
    assert back.request_id == "req-1" and back.layer == 2 and back.block_ids == (7, 3, 9)
    assert back.key.dtype == dtype and torch.equal(back.key, k) and torch.equal(back.value, v)


def test_codec_rejects_a_payload_that_does_not_match_its_shape():
    k, v = layer_kv(2, 2)
    msg = chunk_to_proto(KvChunk("r", 0, (0, 1), k, v))
    msg.key = msg.key[:-2]
    with pytest.raises(KvRejected, match="bytes"):
        chunk_from_proto(msg)
    msg = chunk_to_proto(KvChunk("r", 0, (0, 1), k, v))
    msg.dtype = "int8"
    with pytest.raises(KvRejected, match="dtype"):
        chunk_from_proto(msg)


def test_receiver_writes_only_into_live_reservations():
    pool = PoolWrites(num_layers=2, num_blocks=8)
    rx = KvReceiver(pool.write, 2, BLOCK, torch.bfloat16)
    rx.expect("a", [5, 2], ttl_s=60)
    k, v = layer_kv(2, 3)

    with pytest.raises(KvRejected, match="no reservation"):
        rx.accept(KvChunk("unknown", 0, (5, 2), k, v))
    with pytest.raises(KvRejected, match=r"not .*in its reservation"):
        rx.accept(KvChunk("a", 0, (5, 3), k, v))
    with pytest.raises(KvRejected, match="layer 2 out of range"):
        rx.accept(KvChunk("a", 2, (5, 2), k, v))
    with pytest.raises(KvRejected, match="expected"):
        rx.accept(KvChunk("a", 0, (5, 2), k.float(), v.float()))
    # Nothing was written by any rejected chunk.
    assert all(not t.any() for t in pool.k + pool.v)

    rx.accept(KvChunk("a", 0, (5, 2), k, v))
    assert not rx.is_complete("a")  # layer 1 missing
    rx.accept(KvChunk("a", 1, (5,), k[:1], v[:1]))
    assert not rx.is_complete("a")  # block 2 of layer 1 missing
    rx.accept(KvChunk("a", 1, (2,), k[1:], v[1:]))
    assert rx.is_complete("a") and rx.num_bytes("a") == 2 * (k.nbytes + v.nbytes)
    assert torch.equal(pool.k[0][5], k[0]) and torch.equal(pool.v[1][2], v[1])

    rx.close("a")
    with pytest.raises(KvRejected, match="no reservation"):
        rx.accept(KvChunk("a", 0, (5, 2), k, v))
    assert len(rx) == 0


def test_reservation_expires():
    pool = PoolWrites(num_layers=1, num_blocks=4)
    rx = KvReceiver(pool.write, 1, BLOCK, torch.bfloat16)
    rx.expect("slow", [0], ttl_s=0.05)
    rx.expect("fine", [1], ttl_s=60)
    time.sleep(0.1)
    k, v = layer_kv(1, 4)
    with pytest.raises(KvRejected, match="expired"):
        rx.accept(KvChunk("slow", 0, (0,), k, v))
    rx.accept(KvChunk("fine", 0, (1,), k, v))
    assert not pool.k[0][0].any()


class LoopbackSender(KvSender):
    """The sender interface driven straight into a receiver (no transport):
    checks send_kv's protocol, chunk by chunk, then the acknowledgement."""

    def __init__(self, rx: KvReceiver, request_id: str):
        self.rx, self.request_id, self.sent = rx, request_id, 0

    async def send(self, chunk: KvChunk) -> None:
        self.sent += 1
        self.rx.accept(chunk)

    async def finish(self, stats: TransferStats) -> bool:
        assert stats.num_chunks == self.sent
        return self.rx.is_complete(self.request_id)


def test_send_kv_moves_a_real_prompts_kv_between_two_engines(tiny_llama):
    """Prefill on one engine, ship every layer through send_kv into the other
    engine's reservation; the decode engine then continues exactly as one
    engine would have."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 60))
    prefill = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)
    decode = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)
    expected = prefill.generate([prompt], params, use_tqdm=False)[0].token_ids

    p_eng, d_eng = prefill.engine, decode.engine
    req = p_eng.make_request(prompt, SamplingParams(temperature=0, max_tokens=1), "r")
    req.hold_blocks_on_finish = True
    p_eng.add_request(req)
    (out,) = [o for _ in range(8) for o in p_eng.step()]
    table = list(d_eng.reserve_remote(d_eng.make_request(prompt, params, "r")))
    runner = d_eng.runner
    k_cache = runner.kv_caches[0][0]
    rx = KvReceiver(runner.write_blocks, len(runner.kv_caches), k_cache.shape[1:], k_cache.dtype)
    rx.expect("r", table, ttl_s=60)
    src = list(p_eng.block_pool.block_table("r"))
    ok, stats = asyncio.run(
        send_kv(
            LoopbackSender(rx, "r"),
            "r",
            table,
            lambda layer: p_eng.runner.read_blocks(layer, src),
            num_layers=len(p_eng.runner.kv_caches),
            max_chunk_bytes=3000,  # several chunks per layer
        )
    )
    assert ok and stats.num_chunks > len(p_eng.runner.kv_caches)
    p_eng.release_blocks("r")
    d_eng.remote_kv_done("r", out.token_ids[0])
    outs = {}
    while d_eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in d_eng.step()})
    assert outs["r"].token_ids == expected
    for eng in (p_eng, d_eng):
        assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks
