"""The Ray object-store backend of kvtransfer, on a real local Ray: a prefill
engine in a Ray actor returns a prompt's KV as the call's value; the decode
engine here writes it into its reservation and continues exactly as one
engine would, even after the prefill actor is gone (the caller owns the
objects)."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from kvtransfer.base import KvReceiver, KvRejected
from kvtransfer.ray_backend import pack, receive_payload
from tests.procs import descendants, listening_addresses

# Loopback only, no usage stats, no auth token left behind.
# Ray reads these when it is imported, so before the import.
for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

ray = pytest.importorskip("ray", reason="ray is not installed")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def test_kv_through_the_object_store_equals_one_engine(local_ray, tiny_llama):
    model = str(tiny_llama)

    # Defined here so Ray ships the class by value (no import of tests/ there).
    @ray.remote(num_cpus=1)
    class Prefill:
        def __init__(self, model: str) -> None:
            self.llm = LLM(model, dtype="float32", kv_cache_bytes=8 << 20)

        def prefill(self, rid: str, prompt: list[int], dest_blocks: list[int], reservation: int):
            eng = self.llm.engine
            params = SamplingParams(temperature=0, max_tokens=1)
            req = eng.make_request(prompt, params, rid)
            req.hold_blocks_on_finish = True
            eng.add_request(req)
            (out,) = [o for _ in range(16) for o in eng.step()]
            table = eng.block_pool.block_table(rid)  # held for the transfer
            layers = [eng.runner.read_blocks(i, table) for i in range(len(eng.runner.kv_caches))]
            try:
                return out.token_ids[0], pack(rid, dest_blocks, layers, reservation)
            finally:
                eng.release_blocks(rid)

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(5, 60)), list(range(100, 117)), [7] * 40]
    decode = LLM(model, dtype="float32", kv_cache_bytes=8 << 20)
    expected = [o.token_ids for o in decode.generate(prompts, params, use_tqdm=False)]

    d_eng = decode.engine
    runner = d_eng.runner
    k_cache = runner.kv_caches[0][0]
    rx = KvReceiver(runner.write_blocks, len(runner.kv_caches), k_cache.shape[1:], k_cache.dtype)
    actor = Prefill.remote(model)
    refs = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        table = list(d_eng.reserve_remote(d_eng.make_request(prompt, params, rid)).block_ids)
        reservation = rx.expect(rid, table, ttl_s=60)
        refs[rid] = actor.prefill.remote(rid, prompt, table, reservation)
    results = {rid: ray.get(ref) for rid, ref in refs.items()}
    # The objects are ours: they outlive the prefill actor.
    ray.kill(actor)
    for rid, (first, payload) in results.items():
        assert payload.nbytes > 0
        receive_payload(rx, payload)
        assert rx.is_complete(rid)
        rx.close(rid)
        d_eng.remote_kv_done(rid, first)
    outs = {}
    while d_eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in d_eng.step()})
    assert [outs[f"r{i}"].token_ids for i in range(len(prompts))] == expected
    assert d_eng.block_pool.num_free_blocks == d_eng.block_pool.num_blocks

    # A payload for blocks that are not reserved is refused, and nothing is written.
    first, payload = results["r0"]
    with pytest.raises(KvRejected, match="no reservation"):
        receive_payload(rx, payload)
    # Nor is one for an earlier reservation of a request id reserved again.
    again = d_eng.reserve_remote(d_eng.make_request(prompts[0], params, "r0"))
    assert again is not None
    rx.expect("r0", again.to_fill, ttl_s=60)
    before = [t.clone() for layer in runner.kv_caches for t in layer]
    with pytest.raises(KvRejected, match="not the open one"):
        receive_payload(rx, payload)
    after = [t for layer in runner.kv_caches for t in layer]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    rx.close("r0")
    d_eng.abort_request("r0")


def test_local_ray_listens_on_loopback_only(local_ray):
    addresses = listening_addresses(descendants(os.getpid()))
    assert addresses, "found no listening socket of the local Ray"
    assert addresses <= {"127.0.0.1", "::1"}, addresses
