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
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
