"""The autoscaling policy Ray Serve runs for each pool (in its controller).

Each replica reports its load per signal (`record_autoscaling_stats` in
deploy/ray_app.py: queued prompt tokens, waiting requests, KV-cache usage);
Serve averages each over its look-back window. A pool needs as many
replicas as it takes to bring its signal, summed over its replicas, to the
target per replica:

    replicas = ceil(sum of the signal over replicas / target)

Serve applies the pool's min and max replicas and its upscale and downscale
delays around this (ray.serve.autoscaling_policy). Never utilisation: a busy
GPU says nothing about whether the queue or the KV cache is the limit.
"""

from __future__ import annotations

import math
from typing import Any


class PoolScaler:
    """policy_function for one pool; policy_kwargs give `signal` and `target`."""

    def __init__(self, signal: str, target: float) -> None:
        if target <= 0:
            raise ValueError(f"autoscaling target must be > 0, got {target}")
        self.signal = signal
        self.target = target

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get(self.signal) or {}
        if not per_replica:  # no report yet (replicas starting): stay where we are
            return int(ctx.target_num_replicas), {}
        return desired_replicas(per_replica.values(), self.target), {}


def desired_replicas(values: Any, target: float) -> int:
    """ceil(sum / target), at least 0; bounds are Serve's to apply."""
    total = sum(float(v) for v in values)
    return max(0, math.ceil(total / target - 1e-9))
