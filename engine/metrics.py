"""Per-step engine metrics, the same for every role; labelled with the role
so prefill and decode are never conflated.

Updated from the engine thread at step boundaries (prometheus_client is
thread-safe), never inside the forward pass.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from engine.async_engine import EngineSnapshot, StepInfo


class ReplicaCost:
    """Dollars a replica has cost: price per replica-hour times uptime."""

    def __init__(self, price_per_hour: float = 0.0) -> None:
        self.price_per_hour = price_per_hour
        self.started = time.monotonic()

    def dollars(self) -> float:
        return self.price_per_hour * (time.monotonic() - self.started) / 3600.0


BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        labels = ["role"]
        self.role = role
        # process_cpu_seconds_total and friends: on a CPU deployment, how busy
        # each pool's cores are (the doctor and the side-by-side bench read it).
        ProcessCollector(registry=registry)
        self.step_seconds = Histogram(
            "splitserve_engine_step_seconds",
            "Duration of one engine iteration (schedule, forward, sample).",
            labels,
            buckets=STEP_BUCKETS,
            registry=registry,
        ).labels(role)
        self.batch_size = Histogram(
            "splitserve_engine_batch_size",
            "Requests computed in one engine iteration (the running batch).",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(role)
        self.running = Gauge(
            "splitserve_running_requests",
            "Requests in the running batch.",
            labels,
            registry=registry,
        ).labels(role)
        self.waiting = Gauge(
            "splitserve_waiting_requests",
            "Requests queued for the batch (including preempted ones).",
            labels,
            registry=registry,
        ).labels(role)
        self.waiting_prompt_tokens = Gauge(
            "splitserve_waiting_prompt_tokens",
            "Prompt tokens not yet computed, over queued requests.",
            labels,
            registry=registry,
        ).labels(role)
        self.kv_usage = Gauge(
            "splitserve_kv_cache_usage_ratio",
            "Fraction of KV blocks in use (reserved, running or held).",
            labels,
            registry=registry,
        ).labels(role)
        self.kv_blocks_free = Gauge(
            "splitserve_kv_blocks_free", "KV blocks free.", labels, registry=registry
        ).labels(role)
        self.preemptions = Counter(
            "splitserve_preemptions",
            "Requests whose KV was dropped to make room (recomputed later).",
            labels,
            registry=registry,
        ).labels(role)
        self._preemptions_seen = 0
        self.prefix_queries = Counter(
            "splitserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (at each request's first admission).",
            labels,
            registry=registry,
        ).labels(role)
        self.prefix_hits = Counter(
            "splitserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache: their KV was reused, not computed.",
            labels,
            registry=registry,
        ).labels(role)
        self._prefix_seen = (0, 0)
        self._produced: Counter | None = None
        self.cost = ReplicaCost()
        Gauge(
            "splitserve_cost_dollars",
            "What this replica has cost since it started: its price per hour times its uptime.",
            labels,
            registry=registry,
        ).labels(role).set_function(self.cost.dollars)
        Gauge(
            "splitserve_tokens_per_dollar",
            "Tokens this replica produced per dollar it cost, since it started (decode and "
            "colocated: output tokens; prefill: prompt tokens). 0 when no price is set.",
            labels,
            registry=registry,
        ).labels(role).set_function(self._tokens_per_dollar)

    def count_produced(self, counter: Counter) -> None:
        """What this role produces (a counter labelled by role): output tokens
        for decode and colocated, prompt tokens for prefill."""
        self._produced = counter

    def tokens_produced(self) -> int:
        """The produced counter's value for this role. Read from the counter
        alone: collecting the whole registry here would call the
        tokens-per-dollar gauge, which calls this."""
        if self._produced is None:
            return 0
        for family in self._produced.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("role") == self.role:
                    return int(sample.value)
        return 0

    def _tokens_per_dollar(self) -> float:
        dollars = self.cost.dollars()
        return self.tokens_produced() / dollars if dollars > 0 else 0.0

    def observe_step(self, step: StepInfo) -> None:
        self.step_seconds.observe(step.duration_s)
        self.batch_size.observe(step.num_scheduled)

    def observe_snapshot(self, snap: EngineSnapshot) -> None:
        self.running.set(snap.running)
        self.waiting.set(snap.waiting)
        self.waiting_prompt_tokens.set(snap.waiting_prompt_tokens)
        self.kv_usage.set(snap.kv_usage)
        self.kv_blocks_free.set(snap.kv_blocks_free)
        if snap.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(snap.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = snap.num_preemptions
        queries, hits = self._prefix_seen
        self.prefix_queries.inc(snap.prefix_queries - queries)
        self.prefix_hits.inc(snap.prefix_hits - hits)
        self._prefix_seen = (snap.prefix_queries, snap.prefix_hits)
