"""`splitserve doctor`'s window arithmetic and its diagnoses."""

from __future__ import annotations

import pytest

from deploy.cluster_metrics import PoolReport, Snapshot, parse_metrics, window_quantile
from deploy.doctor import diagnose

HIST = """# TYPE splitserve_router_ttft_seconds histogram
splitserve_router_ttft_seconds_bucket{{le="0.1"}} {a}
splitserve_router_ttft_seconds_bucket{{le="0.5"}} {b}
splitserve_router_ttft_seconds_bucket{{le="+Inf"}} {c}
splitserve_router_ttft_seconds_count {c}
splitserve_router_ttft_seconds_sum 1.0
"""


def _snap(a: int, b: int, c: int) -> Snapshot:
    return Snapshot(0.0, [], parse_metrics(HIST.format(a=a, b=b, c=c)))


def test_window_quantiles_interpolate_like_prometheus():
    before, after = _snap(10, 10, 10), _snap(20, 30, 30)
    # Over the window: 10 requests under 0.1 s, 10 more under 0.5 s.
    assert window_quantile(before, after, None, "splitserve_router_ttft_seconds", 0.5) == (
        pytest.approx(0.1)
    )
    assert window_quantile(before, after, None, "splitserve_router_ttft_seconds", 0.75) == (
        pytest.approx(0.3)
    )
    assert window_quantile(after, after, None, "splitserve_router_ttft_seconds", 0.5) is None


def _pool(role: str, **figures: float) -> PoolReport:
    base = dict(
        replicas=1, running=0, waiting=0, queued_prompt_tokens=0, queued_prompt_tokens_change=0,
        kv_usage=0.1, kv_blocks_total=1000, mean_batch=None, fits_sequences=None,
        rejected_full=0, preemptions=0, tokens_per_dollar=None, max_num_seqs=64, cores_busy=None,
    )  # fmt: skip
    return PoolReport(role=role, **{**base, **figures})  # type: ignore[arg-type]


def test_an_slo_miss_names_the_pool_to_grow():
    # A decode batch at its cap, KV roomy, and requests waiting: without an
    # SLO the remedy is a bigger batch; with TPOT already over it, it is not.
    decode = _pool("decode", running=64, waiting=10, mean_batch=60.0, kv_usage=0.3)
    prefill = _pool("prefill")
    latency = {
        "router_tpot_p95": 0.08,
        "router_ttft_p95": 2.0,
        "prefill_queue_p95": 1.5,
        "prefill_compute_p95": 0.3,
    }
    assert any("raise max_num_seqs" in d for d in diagnose([decode, prefill], latency))
    d = diagnose([decode, prefill], latency, slo={"tpot": 0.05, "ttft": 1.0})
    assert any(
        "TPOT p95 80 ms is over the SLO's 50 ms" in x and "add decode replicas" in x for x in d
    )
    assert not any("raise max_num_seqs" in x for x in d)
    assert [x for x in d if "add prefill replicas" in x] == [
        "TTFT p95 2000 ms is over the SLO's 1000 ms (prefill queue p95 1500 ms): prompts wait "
        "for a free engine: add prefill replicas"
    ]
    # A prompt whose own compute is over the SLO: more replicas will not help.
    slow = {**latency, "prefill_queue_p95": 0.0, "prefill_compute_p95": 1.2}
    d = diagnose([decode, prefill], slow, slo={"ttft": 1.0})
    assert any("more replicas will not help" in x for x in d)
    # Within the SLO, nothing is said about it.
    d = diagnose([decode, prefill], latency, slo={"tpot": 0.1, "ttft": 3.0})
    assert not any("SLO" in x for x in d)


def test_routing_that_ignores_the_prefix_cache_is_named():
    # Two prefill workers find a third of prompt tokens cached, yet the router
    # sent nothing where it was cached (round robin): say so.
    spread = _pool("prefill", replicas=2, prefix_hit_rate=0.3, routed_to_cache=0)
    assert any("defeating the cache" in d for d in diagnose([spread], {}))
    # Steered by cache_aware, or a single worker, or no sharing at all: nothing to say.
    steered = _pool("prefill", replicas=2, prefix_hit_rate=0.3, routed_to_cache=12)
    alone = _pool("prefill", replicas=1, prefix_hit_rate=0.3)
    unshared = _pool("prefill", replicas=2, prefix_hit_rate=0.0)
    for p in (steered, alone, unshared):
        assert not any("defeating the cache" in d for d in diagnose([p], {}))
