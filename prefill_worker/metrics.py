"""The prefill worker's metrics, in one registry per process. Every metric's
name and meaning is listed in README.md (Metrics); the help strings say the same."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.metrics import EngineMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PrefillMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.engine = EngineMetrics(r, "prefill")
        self.queue_seconds = Histogram(
            "splitserve_prefill_queue_seconds",
            "Arrival at the prefill worker to first scheduled.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "splitserve_prefill_compute_seconds",
            "First scheduled to first token: the prompt's forward passes.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "splitserve_prefill_ttft_seconds",
            "Arrival at the prefill worker to first token sent.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        prompt_tokens = Counter(
            "splitserve_prompt_tokens", "Prompt tokens computed.", ["role"], registry=r
        )
        self.prompt_tokens = prompt_tokens.labels("prefill")
        self.engine.count_produced(prompt_tokens)
        self.kv_bytes = Counter(
            "splitserve_kv_transfer_bytes",
            "KV payload bytes moved between workers.",
            ["role", "direction"],
            registry=r,
        ).labels("prefill", "sent")
        self.kv_seconds = Histogram(
            "splitserve_kv_transfer_seconds",
            "One request's KV transfer: first chunk to acknowledgement.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels("prefill")
        self.requests = Counter(
            "splitserve_requests", "Requests by outcome.", ["role", "outcome"], registry=r
        )
        self.kv_lease_expired = Counter(
            "splitserve_kv_lease_expired",
            "Finished prompts whose held KV blocks were freed because the decode worker "
            "did not acknowledge the KV within the lease (--kv-lease).",
            ["role"],
            registry=r,
        ).labels("prefill")
