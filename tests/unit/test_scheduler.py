"""The scheduler and block pool together, driven step by step.

Sampled tokens come from the test (the scheduler never sees a model), so each
scenario controls exactly when requests grow, stop and finish.
"""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2


def make(num_blocks=64, block_size=4, max_seqs=8, budget=64, max_len=1000) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), BlockPool(num_blocks, block_size))


def req(rid: str, prompt_len: int, **params) -> Request:
    params.setdefault("max_tokens", 100)
    params.setdefault("temperature", 0.0)
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(**params))


def step(s: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list[Request]]:
    """One iteration, sampling `token` wherever a sample is due."""
    out = s.schedule()
    samples = [(token, None) if x.completes_known_tokens else None for x in out.scheduled]
    return out, s.update(out, samples, eos_token_ids=[EOS])


def ids(out: SchedulerOutput) -> list[str]:
    return [x.request.request_id for x in out.scheduled]


def assert_clean(s: Scheduler) -> None:
    s.pool.check_integrity()
    assert not s.has_unfinished()
    assert s.pool.num_free_blocks == s.pool.num_blocks


def run_to_end(s: Scheduler, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not s.has_unfinished():
            return
        step(s)
    raise AssertionError("scheduler did not drain")


def test_prefill_then_decode_one_token_per_step():
    s = make()
    a = req("a", 10, max_tokens=3)
    s.add_request(a)
    out, fin = step(s)
    assert [x.num_new_tokens for x in out.scheduled] == [10]
    assert a.output_token_ids == [7] and a.num_computed_tokens == 10 and not fin
    out, _ = step(s)
    assert [x.num_new_tokens for x in out.scheduled] == [1] and a.num_computed_tokens == 11
    _, fin = step(s)
    assert fin == [a] and a.status is RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [7, 7, 7]
    assert_clean(s)


def test_admission_waits_for_blocks():
    s = make(num_blocks=4, block_size=4)
    a, b = req("a", 10, max_tokens=2), req("b", 8, max_tokens=1)  # 3 blocks, then 2
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s)
    assert ids(out) == ["a"]  # b needs 2 blocks, 1 is free
    assert b.status is RequestStatus.WAITING and s.pool.block_table("b") == ()
    out, fin = step(s)  # a finishes and frees its blocks
    assert fin == [a]
    out, fin = step(s)  # ...and b is admitted at the very next step
    assert ids(out) == ["b"] and fin == [b]
    assert_clean(s)


def test_finished_slot_is_refilled_next_step():
    s = make(max_seqs=2)
    short, long_, queued = req("short", 4, max_tokens=2), req("long", 4), req("queued", 4)
    for r in (short, long_, queued):
        s.add_request(r)
    out, _ = step(s)
    assert ids(out) == ["short", "long"]  # the cap holds "queued" back
    out, fin = step(s)
    assert fin == [short] and ids(out) == ["short", "long"]
    out, _ = step(s)
    assert ids(out) == ["long", "queued"]  # refilled at once
    s.abort_request("long")
    s.abort_request("queued")
    assert_clean(s)


def test_chunked_prefill_rides_with_decodes_and_samples_only_at_the_end():
    s = make(budget=8)
    a = req("a", 4)
    s.add_request(a)
    step(s)  # a prefilled, now decoding
    b = req("b", 20)
    s.add_request(b)
    chunks = []
    for _ in range(3):
        out, _ = step(s)
        assert out.scheduled[0].request is a and out.scheduled[0].num_new_tokens == 1
        chunks.append(out.scheduled[1].num_new_tokens)
        assert out.num_tokens <= 8
    # Budget 8 minus a's decode token each step: chunks of 7, 7, then the rest.
    assert chunks == [7, 7, 6]
    assert b.num_output_tokens == 1 and b.num_computed_tokens == 20
    assert a.num_output_tokens == 4
    for r in ("a", "b"):
        s.abort_request(r)
    assert_clean(s)


def test_preemption_recomputes_newest_and_resumes():
    # 6 blocks of 4 tokens: two requests of 8-token prompts fit (2 blocks each)
    # and grow until the pool runs dry.
    s = make(num_blocks=6, block_size=4)
    old, new = req("old", 8, max_tokens=12), req("new", 8, max_tokens=12)
    s.add_request(old)
    s.add_request(new)
    preempted_at = None
    for i in range(40):
        out, _ = step(s)
        if out.preempted:
            preempted_at = i
            # The newest is the victim; the oldest keeps going.
            assert out.preempted == [new] and ids(out) == ["old"]
            assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
            assert s.pool.block_table("new") == ()
            break
        s.pool.check_integrity()
    assert preempted_at is not None
    generated_before = list(new.output_token_ids)
    run_to_end(s)
    # On resumption it recomputes prompt + generated, and loses nothing.
    assert (
        new.num_preemptions >= 1
        and new.output_token_ids[: len(generated_before)] == generated_before
    )
    assert old.num_output_tokens == 12 and new.num_output_tokens == 12
    assert old.status is new.status is RequestStatus.FINISHED_LENGTH
    assert_clean(s)


def test_recompute_schedules_prompt_and_generated_tokens():
    s = make(num_blocks=64, block_size=4)
    a = req("a", 5)
    s.add_request(a)
    step(s)
    step(s)
    s._preempt(s.running.pop())
    out, _ = step(s)
    assert out.scheduled[0].num_new_tokens == 7  # 5 prompt + 2 generated
    s.abort_request("a")
    assert_clean(s)


def test_abort_frees_blocks_wherever_the_request_is():
    s = make(num_blocks=4, block_size=4, max_seqs=1)
    a, b = req("a", 8), req("b", 8)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.pool.num_free_blocks == 2
    assert s.abort_request("b").status is RequestStatus.FINISHED_ABORTED  # waiting
    assert s.abort_request("a").status is RequestStatus.FINISHED_ABORTED  # running
    assert s.abort_request("a") is None
    assert_clean(s)


def test_abort_during_step_is_not_resurrected():
    s = make()
    a = req("a", 4)
    s.add_request(a)
    out = s.schedule()
    s.abort_request("a")
    assert s.update(out, [(7, None)], eos_token_ids=[EOS]) == []
    assert a.output_token_ids == [] and a.status is RequestStatus.FINISHED_ABORTED
    assert_clean(s)


@pytest.mark.parametrize(
    ("params", "token", "status", "stop_reason"),
    [
        ({}, EOS, RequestStatus.FINISHED_STOPPED, None),
        ({"ignore_eos": True, "max_tokens": 1}, EOS, RequestStatus.FINISHED_LENGTH, None),
        ({"stop_token_ids": [9]}, 9, RequestStatus.FINISHED_STOPPED, 9),
        ({"max_tokens": 1}, 7, RequestStatus.FINISHED_LENGTH, None),
    ],
)
def test_stop_conditions(params, token, status, stop_reason):
    s = make()
    a = req("a", 4, **params)
    s.add_request(a)
    _, fin = step(s, token)
    assert fin == [a] and a.status is status and a.stop_reason == stop_reason
    assert a.output_token_ids == [token]  # the stop token is kept, like EOS
    assert_clean(s)


def test_context_length_stops_a_request():
    s = make(max_len=6)
    a = req("a", 4, max_tokens=100)
    s.add_request(a)
    run_to_end(s)
    assert a.num_tokens == 6 and a.status is RequestStatus.FINISHED_LENGTH
    assert_clean(s)


def test_many_requests_under_pressure_all_finish():
    s = make(num_blocks=12, block_size=4, max_seqs=6, budget=16)
    reqs = [req(f"r{i}", 3 + (i * 7) % 13, max_tokens=5 + (i * 5) % 11) for i in range(20)]
    for r in reqs:
        s.add_request(r)
    for _ in range(2000):
        if not s.has_unfinished():
            break
        out, _ = step(s)
        assert len(out.scheduled) <= 6 and out.num_tokens <= 16
        s.pool.check_integrity()
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in reqs)
    assert s.stats.num_preemptions > 0
    assert_clean(s)


def test_duplicate_request_id_is_rejected():
    s = make()
    s.add_request(req("a", 4))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 4))
