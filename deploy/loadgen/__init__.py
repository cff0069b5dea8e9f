"""`splitserve bench`: load against any OpenAI-compatible completions
endpoint (splitserve's, or another server's), measured the way vLLM's
`bench serve` measures it.

`workload` makes the requests of a run and their arrival times, `client`
sends them and times each one, `report` turns the timings into a run's
figures, `plots` draws them. Callers import the names below from here.
"""

from deploy.loadgen.client import RequestResult, cluster_cost, dispatch, run_load
from deploy.loadgen.plots import plot
from deploy.loadgen.report import (
    PERCENTILES,
    format_summary,
    latency_stats,
    meets,
    record,
    samples,
    summarize,
)
from deploy.loadgen.workload import (
    DATASETS,
    SEED_OUTPUT_LENS,
    SLO_METRICS,
    BenchError,
    RequestSpec,
    arrival_times,
    check_context,
    make_dataset,
    parse_rates,
    parse_slo,
)

__all__ = [
    "DATASETS",
    "PERCENTILES",
    "SEED_OUTPUT_LENS",
    "SLO_METRICS",
    "BenchError",
    "RequestResult",
    "RequestSpec",
    "arrival_times",
    "check_context",
    "cluster_cost",
    "dispatch",
    "format_summary",
    "latency_stats",
    "make_dataset",
    "meets",
    "parse_rates",
    "parse_slo",
    "plot",
    "record",
    "run_load",
    "samples",
    "summarize",
]
