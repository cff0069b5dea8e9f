"""The decode worker's metrics, in one registry per process. Every metric's
name and meaning is listed in README.md (Metrics); the help strings say the same."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.metrics import EngineMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class DecodeMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.engine = EngineMetrics(r, role)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["role"], buckets=buckets, registry=r).labels(role)

        self.ttft_seconds = hist(
            "splitserve_decode_ttft_seconds",
            "Arrival at the decode worker to first token sent to the router.",
            LATENCY_BUCKETS,
        )
        self.tpot_seconds = hist(
            "splitserve_decode_tpot_seconds",
            "Per request: (finish - first token) / (output tokens - 1).",
            TOKEN_BUCKETS,
        )
        self.itl_seconds = hist(
            "splitserve_decode_itl_seconds",
            "Gap between consecutive output tokens of a request.",
            TOKEN_BUCKETS,
        )
        self.e2e_seconds = hist(
            "splitserve_decode_e2e_seconds",
            "Arrival at the decode worker to the last token.",
            LATENCY_BUCKETS,
        )
        self.queue_seconds = hist(
            "splitserve_decode_queue_seconds",
            "Ready to run (KV received, or arrival when prefilling here) to first scheduled.",
            LATENCY_BUCKETS,
        )
        self.kv_seconds = hist(
            "splitserve_kv_transfer_seconds",
            "One request's KV transfer: first token received to last chunk written.",
            LATENCY_BUCKETS,
        )
        self.kv_bytes = Counter(
            "splitserve_kv_transfer_bytes",
            "KV payload bytes moved between workers.",
            ["role", "direction"],
            registry=r,
        ).labels(role, "received")
        self.prompt_tokens = Counter(
            "splitserve_prompt_tokens", "Prompt tokens of finished requests.", ["role"], registry=r
        ).labels(role)
        generation_tokens = Counter(
            "splitserve_generation_tokens", "Output tokens generated.", ["role"], registry=r
        )
        self.generation_tokens = generation_tokens.labels(role)
        self.engine.count_produced(generation_tokens)
        self.requests = Counter(
            "splitserve_requests", "Requests by outcome.", ["role", "outcome"], registry=r
        )
        self.rejected_full = Counter(
            "splitserve_decode_rejected_full",
            "Requests turned away because the KV cache had no room (the router retries).",
            ["role"],
            registry=r,
        ).labels(role)
        self.prefill_retries = Counter(
            "splitserve_decode_prefill_retries",
            "Prefill attempts that failed and moved on (next prefill worker or local).",
            ["role", "reason"],
            registry=r,
        )
        self.local_prefills = Counter(
            "splitserve_decode_local_prefills",
            "Disaggregated requests prefilled here because no prefill worker answered.",
            ["role"],
            registry=r,
        ).labels(role)
        self.migrations_in = Counter(
            "splitserve_decode_migrations_in",
            "Requests taken over mid-stream from a failed decode worker (recomputed here).",
            ["role"],
            registry=r,
        ).labels(role)
        self.rejected_overloaded = Counter(
            "splitserve_decode_rejected_overloaded",
            "Requests refused at once because the queue was at its bound (the router retries "
            "elsewhere or answers 503).",
            ["role"],
            registry=r,
        ).labels(role)
        self.kv_failures = Counter(
            "splitserve_kv_failures",
            "Prefills that failed after the first token went out, by what followed "
            "(recomputed here, or the request failed).",
            ["role", "outcome"],
            registry=r,
        )
        self.prefill_unknown = Counter(
            "splitserve_decode_prefill_unknown",
            "Prefill worker addresses a request named that this decode worker does not know "
            "(not in --prefill-addresses/--prefill-dns/the Ray directory), so never dialled.",
            ["role"],
            registry=r,
        ).labels(role)
