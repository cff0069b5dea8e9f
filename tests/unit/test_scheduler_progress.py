"""The scheduler's progress invariant, under every interleaving.

A hypothesis state machine drives one Scheduler and its BlockPool through
random sequences of what the three roles do to them: requests added (some
holding their blocks on finish, as a prefill worker's do), reservations for
remote KV (starting from a cached prefix, as a decode worker's do), KV
arrivals (whole, or failed after the first token), aborts, releases of held
KV, and steps with random samples, on pools of 4 to 64 blocks, with prefix
caching on or off (prompts drawn from a few shared beginnings, so blocks are
shared, revived and evicted). A shadow of the KV pool records which tokens
each slot was computed (or received) for: every computed position of a
scheduled request must hold its own prefix's KV (sharing and eviction never
hand a request wrong KV), and a step or a KV arrival only ever writes into
blocks no one else holds. After every operation the pool's bookkeeping must
be intact; every step must schedule something whenever a request could run,
unless blocks are pinned by an event from outside (KV still arriving, held
KV not yet acknowledged); and at the end, once those events have happened,
everything finishes and the pool is all free.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.block_pool import BlockPool
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

EOS = 2
TOKENS = st.sampled_from([7, 7, 7, 9, EOS])  # EOS now and then ends a request early


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 64),
        block_size=st.sampled_from([1, 2, 4, 16]),
        max_num_seqs=st.integers(1, 8),
        budget=st.integers(1, 64),
        watermark=st.integers(0, 4),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, max_num_seqs, budget, watermark, caching):
        self.max_model_len = 4 * num_blocks * block_size
        config = SchedulerConfig(max_num_seqs, budget, self.max_model_len, watermark)
        self.s = Scheduler(config, BlockPool(num_blocks, block_size, enable_caching=caching))
        # block -> slot -> the tokens (a prefix) whose KV the slot holds
        self.kv: dict[int, dict[int, tuple[int, ...]]] = {}
        # reservation -> the prompt position its received KV starts at
        self.received_from: dict[str, int] = {}
        self.next_id = 0
        self.empty_steps = 0
        self.steps = 0

    # -- what the roles do -------------------------------------------------------

    def _request(self, prompt_len: int, max_tokens: int, family: int = 0) -> Request | None:
        """A request the engine would admit: one that fits the whole pool."""
        pool = self.s.pool
        longest = min(prompt_len + max_tokens, self.max_model_len)
        if pool.blocks_for_tokens(longest) > pool.num_blocks:
            return None
        self.next_id += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        # A few beginnings shared by many prompts, then each family's own tokens.
        prompt = [5] * min(prompt_len, 8 * family) + [10 + family] * prompt_len
        return Request(f"r{self.next_id}", prompt[:prompt_len], params)

    @rule(
        prompt_len=st.integers(1, 80),
        max_tokens=st.integers(1, 40),
        hold=st.booleans(),
        family=st.integers(0, 3),
    )
    def add(self, prompt_len, max_tokens, hold, family):
        req = self._request(prompt_len, max_tokens, family)
        if req is not None:
            req.hold_blocks_on_finish = hold  # a prefill worker's request
            self.s.add_request(req)

    @rule(prompt_len=st.integers(1, 80), max_tokens=st.integers(1, 40), family=st.integers(0, 3))
    def reserve(self, prompt_len, max_tokens, family):
        req = self._request(prompt_len, max_tokens, family)
        if req is not None:
            free = self.s.pool.num_free_blocks
            cached = self.s.reserve_for_remote_kv(req)
            if cached is None:
                assert self.s.pool.num_free_blocks == free  # a refusal holds nothing
                assert req.request_id not in self.s.requests
            else:
                # The blocks its prefix cache supplied hold that prefix's KV;
                # only the rest is to be received.
                self._check_computed(req, cached * self.s.pool.block_size)
                self.received_from[req.request_id] = cached * self.s.pool.block_size

    @precondition(lambda self: self.s.awaiting_kv)
    @rule(data=st.data(), token=TOKENS, whole=st.booleans())
    def kv_arrives(self, data, token, whole):
        rid = data.draw(st.sampled_from(sorted(self.s.awaiting_kv)))
        if whole:  # the receiver wrote the prompt's KV into the reservation
            req = self.s.awaiting_kv[rid]
            start = self.received_from[rid]
            self._write(req, start, req.num_prompt_tokens - start)
        self.s.remote_kv_arrived(rid, token, None, [EOS], kv_valid=whole)

    @precondition(lambda self: self.s.requests or self.s.held)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted([*self.s.requests, *self.s.held])))
        self.s.abort_request(rid)
        assert not self.s.pool.block_table(rid)

    @precondition(lambda self: self.s.held)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(sorted(self.s.held)))
        self.s.release_blocks(rid)
        assert not self.s.pool.block_table(rid)

    @precondition(lambda self: self.s.running)
    @rule()
    def preempt_newest(self):
        # What a step does when a running request cannot grow, forced at any time.
        self.s._preempt(self.s.running.pop())

    @rule(token=TOKENS)
    def step(self, token):
        self.steps += 1
        schedulable = self.s.has_schedulable()
        out = self.s.schedule()
        if out.is_empty:
            self.empty_steps += 1
            # The invariant: nothing to run only while outside events pin blocks.
            assert not schedulable or self.s.num_pinned_blocks > 0, (
                f"stalled: {self.s.pool}, {len(self.s.waiting)} waiting"
            )
        for x in out.scheduled:
            assert len(x.block_table) * self.s.pool.block_size >= (
                x.request.num_computed_tokens + x.num_new_tokens
            )
            self._check_computed(x.request)
            self._write(x.request, x.request.num_computed_tokens, x.num_new_tokens)
        samples = [(token, None) if x.completes_known_tokens else None for x in out.scheduled]
        self.s.update(out, samples, [EOS])

    # -- the shadow KV ------------------------------------------------------------

    def _slot(self, req: Request, pos: int) -> tuple[int, int]:
        bs = self.s.pool.block_size
        return self.s.pool.block_table(req.request_id)[pos // bs], pos % bs

    def _write(self, req: Request, start: int, n: int) -> None:
        tokens = req.prompt_token_ids + req.output_token_ids
        for pos in range(start, start + n):
            block, slot = self._slot(req, pos)
            assert self.s.pool._ref_counts[block] == 1, f"a step writes shared block {block}"
            self.kv.setdefault(block, {})[slot] = tuple(tokens[: pos + 1])

    def _check_computed(self, req: Request, upto: int | None = None) -> None:
        tokens = req.prompt_token_ids + req.output_token_ids
        for pos in range(req.num_computed_tokens if upto is None else upto):
            block, slot = self._slot(req, pos)
            assert self.kv.get(block, {}).get(slot) == tuple(tokens[: pos + 1]), (
                f"{req.request_id}: position {pos} in block {block} holds another prefix's KV"
            )

    # -- after every operation ---------------------------------------------------

    @invariant()
    def bookkeeping(self):
        s = self.s
        s.pool.check_integrity()
        holders = {*s.requests, *s.held}
        for rid in s.pool._tables:
            assert rid in holders, f"{rid} holds blocks but the scheduler forgot it"
        for req in s.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            # Only a request whose KV came from elsewhere waits with blocks.
            if s.pool.block_table(req.request_id):
                assert req.num_computed_tokens >= req.num_prompt_tokens
        for req in s.running:
            assert req.status is RequestStatus.RUNNING
        assert len(s.running) <= s.config.max_num_seqs

    def teardown(self):
        # Every outside event happens (KV arrives, held KV is acknowledged):
        # then everything must finish and the pool be all free.
        s = self.s
        for _ in range(20_000):
            for rid in sorted(s.awaiting_kv):
                s.remote_kv_arrived(rid, 7, None, [EOS])
            for rid in sorted(s.held):
                s.release_blocks(rid)
            if not s.has_unfinished():
                break
            out = s.schedule()
            assert not out.is_empty or s.num_pinned_blocks > 0
            samples = [(7, None) if x.completes_known_tokens else None for x in out.scheduled]
            s.update(out, samples, [EOS])
        for rid in sorted(s.held):
            s.release_blocks(rid)
        assert not s.has_unfinished(), f"did not drain: {s.pool}"
        s.pool.check_integrity()
        assert s.pool.num_free_blocks == s.pool.num_blocks


SchedulerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_progress = SchedulerMachine.TestCase


def test_reservations_that_fill_the_pool_do_not_stall_it():
    """The state that killed a decode worker's engine: remote-KV reservations
    take the whole pool, and the first request whose KV arrives needs one
    more block for its first decoded token. Every request must finish."""
    s = Scheduler(SchedulerConfig(8, 2048, 4096, reservation_watermark=0), BlockPool(8, 16))
    reqs = [Request(f"r{i}", [5] * 64, SamplingParams(max_tokens=8)) for i in range(6)]
    granted = [r for r in reqs if s.reserve_for_remote_kv(r) is not None]
    assert granted and s.pool.num_free_blocks < 5  # the rest could not reserve
    for r in granted:
        s.remote_kv_arrived(r.request_id, 7, None, [EOS])
    for r in reqs:
        if r not in granted:
            s.add_request(r)  # prefilled here instead
    for _ in range(1000):
        if not s.has_unfinished():
            break
        out = s.schedule()
        assert not out.is_empty, f"stalled: {s.pool}"
        samples = [(7, None) if x.completes_known_tokens else None for x in out.scheduled]
        s.update(out, samples, [EOS])
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    assert s.pool.num_free_blocks == 8
