"""The router process's Prometheus metrics (served at /metrics).

Latencies are client-seen: measured from the request's arrival at the router
to when its tokens left the router, so they include routing, queueing on the
workers, prefill, the KV transfer's effect on decode, and retries.

Name (type, labels): meaning.

- splitserve_router_requests_total (counter; endpoint, status): requests
  answered. endpoint: "completions" | "chat_completions"; status: the HTTP
  status, "stream_error" for a stream ended by an error event, "499" for a
  client that went away.
- splitserve_router_requests_in_flight (gauge): requests being handled now;
  a stream counts until its last byte.
- splitserve_router_ttft_seconds (histogram): arrival to first token.
- splitserve_router_tpot_seconds (histogram): time per output token after the
  first, one sample per request: (e2e - ttft) / (tokens - 1).
- splitserve_router_itl_seconds (histogram): inter-token latency, one sample
  per token; a message of k tokens after a gap g counts k gaps of g / k.
- splitserve_router_e2e_latency_seconds (histogram): arrival to last token, for
  requests that finished.
- splitserve_router_prompt_tokens_total (counter): prompt tokens of requests a
  decode worker accepted.
- splitserve_router_generation_tokens_total (counter): generated tokens received.
- splitserve_router_retries_total (counter; reason): Generate attempts that
  failed before the first token, after which the router tries another decode
  worker (or answers 503 when none is left). reason: "full"
  (RESOURCE_EXHAUSTED), "unavailable" (the worker is down or shutting down),
  "aborted".
- splitserve_router_migrations_total (counter; outcome): requests whose decode
  worker failed after the first token, moved to another decode worker with the
  tokens so far (router/dispatch.py). outcome: "ok" (the new worker streamed
  on), "failed" (no other decode worker took it: the stream ends with an error
  event), "limit" (it had already moved --migration-limit times). Nothing is
  counted with --migration-limit 0.
- splitserve_pool_cost_dollars (gauge; pool): what the pool's workers the
  router knows now have cost since each started (their price per hour times
  their uptime, from their Status).
- splitserve_pool_tokens_per_dollar (gauge; pool): those workers' tokens per
  dollar: output tokens for decode and colocated, prompt tokens for prefill.
- splitserve_cluster_tokens_per_dollar (gauge): output tokens of every decode
  and colocated worker per dollar of every worker, prefill included: what a
  deployment's price buys. 0 where no price is set.
- splitserve_worker_restarts_total (counter; role): workers started again
  after they exited (killed, or their engine died), by the supervisor that
  reports them to the router (`splitserve serve`'s launcher; absent elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# From 1 ms to 10 minutes, roughly x2-2.5 per bucket.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
)  # fmt: skip
# Per-token times are much shorter than request times.
TOKEN_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class RouterMetrics:
    """One registry per app, so that two routers in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitserve_router_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "splitserve_router_requests_in_flight", "Requests being handled now.", registry=r
        )
        self.ttft = Histogram(
            "splitserve_router_ttft_seconds",
            "Arrival at the router to first token, client-seen.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "splitserve_router_tpot_seconds",
            "Time per output token after the first, per request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "splitserve_router_itl_seconds",
            "Inter-token latency, per token gap.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "splitserve_router_e2e_latency_seconds",
            "Arrival at the router to last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitserve_router_prompt_tokens", "Prompt tokens sent to workers.", registry=r
        )
        self.generation_tokens = Counter(
            "splitserve_router_generation_tokens", "Tokens generated and received.", registry=r
        )
        self.retries = Counter(
            "splitserve_router_retries",
            "Generate attempts that failed before the first token, by reason.",
            ["reason"],
            registry=r,
        )
        self.migrations = Counter(
            "splitserve_router_migrations",
            "Requests moved to another decode worker after their first token, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "splitserve_router_routing_decisions",
            "Where prompts were sent to be computed, by reason: prefix_cache (the worker "
            "likely held part of the prompt) or load.",
            ["reason"],
            registry=r,
        )

    def track_cost(self, workers: Callable[[], Iterable[Any]]) -> None:
        """Cost and tokens per dollar, per pool and for the cluster, computed
        at scrape time from `workers()`' latest Status (objects with
        `.status`: a WorkerStatus or None)."""

        def by_pool() -> dict[str, tuple[float, float]]:
            totals: dict[str, tuple[float, float]] = {}
            for w in workers():
                s = w.status
                if s is None:
                    continue
                dollars, tokens = totals.get(s.role, (0.0, 0.0))
                totals[s.role] = (dollars + s.cost_dollars, tokens + s.tokens_produced)
            return totals

        def per_dollar(tokens: float, dollars: float) -> float:
            return tokens / dollars if dollars > 0 else 0.0

        cost = Gauge(
            "splitserve_pool_cost_dollars",
            "Dollars the pool's current workers have cost since each started.",
            ["pool"],
            registry=self.registry,
        )
        tpd = Gauge(
            "splitserve_pool_tokens_per_dollar",
            "The pool's tokens per dollar (output tokens; prompt tokens for prefill).",
            ["pool"],
            registry=self.registry,
        )

        def pool_cost(pool: str) -> Callable[[], float]:
            return lambda: by_pool().get(pool, (0.0, 0.0))[0]

        def pool_tokens_per_dollar(pool: str) -> Callable[[], float]:
            def value() -> float:
                dollars, tokens = by_pool().get(pool, (0.0, 0.0))
                return per_dollar(tokens, dollars)

            return value

        for pool in ("prefill", "decode", "colocated"):
            cost.labels(pool).set_function(pool_cost(pool))
            tpd.labels(pool).set_function(pool_tokens_per_dollar(pool))

        def cluster() -> float:
            totals = by_pool()
            dollars = sum(d for d, _ in totals.values())
            output = sum(t for role, (_, t) in totals.items() if role != "prefill")
            return per_dollar(output, dollars)

        Gauge(
            "splitserve_cluster_tokens_per_dollar",
            "Output tokens per dollar of every worker, prefill included.",
            registry=self.registry,
        ).set_function(cluster)

    def track_restarts(self, restarts: Callable[[], Mapping[str, tuple[str, int]]]) -> None:
        """splitserve_worker_restarts_total by role, read at scrape time from
        `restarts()`: address -> (role, times restarted)."""
        self.registry.register(_RestartCollector(restarts))

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_tokens(self, gap_s: float, n: int) -> None:
        """`n` tokens arrived `gap_s` after the previous ones."""
        for _ in range(n):
            self.itl.observe(gap_s / n)
        self.generation_tokens.inc(n)

    def observe_finish(self, ttft_s: float, e2e_s: float, num_tokens: int) -> None:
        self.e2e.observe(e2e_s)
        if num_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RestartCollector(Collector):
    """A counter whose value the supervisor keeps (it only grows)."""

    def __init__(self, restarts: Callable[[], Mapping[str, tuple[str, int]]]) -> None:
        self.restarts = restarts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "splitserve_worker_restarts",
            "Workers started again after they exited, by role.",
            labels=["role"],
        )
        by_role: dict[str, int] = {}
        for role, n in self.restarts().values():
            by_role[role] = by_role.get(role, 0) + n
        for role, n in sorted(by_role.items()):
            family.add_metric([role], n)
        yield family
