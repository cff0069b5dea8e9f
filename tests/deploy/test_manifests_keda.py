"""deploy/k8s/grpc.yaml's ScaledObjects: one per worker pool, bounded and
delayed as deploy/examples/gpu.yaml says, each scaling on its pool's queue
signal through a PromQL query whose every series the worker really exports
(checked against the workers' own metric registries)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from deploy.config import POOL_SIGNALS, UTILISATION_WORDS, ClusterConfig
from tests.manifests import WORKER_POOLS, least_replicas, most_replicas, named, worker_deployments

# What each config signal is called in Prometheus (deploy/config.py POOL_SIGNALS).
SIGNAL_METRICS = {
    "queued_prompt_tokens": "splitserve_waiting_prompt_tokens",
    "kv_cache_usage": "splitserve_kv_cache_usage_ratio",
    "waiting_requests": "splitserve_waiting_requests",
}
# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "topk", "bottomk", "quantile",
    "rate", "irate", "increase", "delta", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "scalar", "vector", "and", "or", "unless", "bool",
    "offset",
}  # fmt: skip


def _exported(module: str, args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    """Every series name the worker's registry exports -> the label sets seen."""
    if module == "prefill_worker":
        from prefill_worker.metrics import PrefillMetrics

        registry = PrefillMetrics().registry
    else:
        from decode_worker.metrics import DecodeMetrics

        registry = DecodeMetrics("colocated" if args.colocated else "decode").registry
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    out: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def _selectors(query: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The series selectors of a PromQL expression: (metric, [(label, op, value)])."""
    q = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", query)
    q = re.sub(r"\[[^\]]*\]", " ", q)  # range and subquery durations
    q = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.+-]*", " ", q)  # numbers
    out = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", q):
        name, braces = m.group(1), m.group(2)
        if name in PROMQL_WORDS and braces is None:
            continue
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        out.append((name, matchers))
    return out


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def test_each_worker_pool_is_autoscaled_by_keda_on_its_queue_signal(
    grpc_docs: list[dict[str, Any]], gpu_config: ClusterConfig
) -> None:
    workers = worker_deployments(grpc_docs)
    scalers = named(grpc_docs, "ScaledObject")
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers.values()]
    assert sorted(targets) == sorted(workers), "exactly one ScaledObject per worker Deployment"
    assert set(SIGNAL_METRICS) >= {s for signals in POOL_SIGNALS.values() for s in signals}

    for name, so in scalers.items():
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in workers, name
        dep, module, args = workers[ref["name"]]
        assert "replicas" not in dep["spec"], (
            f"Deployment {ref['name']}: drop spec.replicas; KEDA's HPA owns it and "
            "`kubectl apply` would reset it"
        )
        pool = getattr(gpu_config.pools, WORKER_POOLS[module])
        assert pool.autoscaling is not None
        spec = so["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
            least_replicas(pool),
            most_replicas(pool),
        ), f"ScaledObject {name}: replica bounds differ from gpu.yaml's pool"
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        behavior = behavior.get("behavior", {})
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == pool.autoscaling.upscale_delay_s
        down = behavior["scaleDown"]["stabilizationWindowSeconds"]
        assert down == pool.autoscaling.downscale_delay_s, f"{name}: scale-down delay"

        exported = _exported(module, args)
        assert spec["triggers"], f"ScaledObject {name} has no trigger"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus", (
                f"ScaledObject {name}: {trigger['type']} trigger; scale on queues, not utilisation"
            )
            meta = trigger["metadata"]
            query = meta["query"]
            assert not [w for w in UTILISATION_WORDS if w in query.lower()], (
                f"ScaledObject {name}: {query!r} looks at utilisation"
            )
            assert meta["serverAddress"].startswith(("http://", "https://"))
            selectors = _selectors(query)
            assert selectors, f"ScaledObject {name}: no metric in {query!r}"
            for metric, matchers in selectors:
                assert metric in exported, (
                    f"ScaledObject {name}: {metric} is not exported by {module} "
                    f"(it exports {sorted(exported)})"
                )
                if exported[metric]:
                    assert any(_matches(labels, matchers) for labels in exported[metric]), (
                        f"ScaledObject {name}: {metric}{matchers} matches no series of "
                        f"{module}: {exported[metric]}"
                    )
            # The configured signal and its per-replica target (AverageValue:
            # replicas = ceil(sum over pods / threshold)).
            assert [m for m, _ in selectors] == [SIGNAL_METRICS[pool.autoscaling.signal]], (
                f"ScaledObject {name}: gpu.yaml scales this pool on {pool.autoscaling.signal}"
            )
            assert float(meta["threshold"]) == pool.autoscaling.target
            aggregation = query.strip().split("(", 1)[0].strip()
            metric_type = trigger.get("metricType", meta.get("metricType", "AverageValue"))
            assert (aggregation, metric_type) in {("sum", "AverageValue"), ("avg", "Value")}, (
                f"ScaledObject {name}: a per-replica threshold needs sum() with AverageValue "
                f"or avg() with Value, not {aggregation}() with {metric_type}"
            )
