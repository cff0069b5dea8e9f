"""Scaling configs for tests: the shipped laptop example, and broken ones
with the words their error must name."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "deploy" / "examples").glob("*.yaml"))


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def base() -> dict:
    return yaml.safe_load(EXAMPLES[[p.name for p in EXAMPLES].index("laptop.yaml")].read_text())


def with_(change) -> dict:
    c = base()
    change(c)
    return c


BAD = {
    "not yaml": ("pools: [unclosed", ["not valid YAML"]),
    "not a mapping": ("- 1\n- 2\n", ["expected a mapping"]),
    "misspelt field": (
        with_(lambda c: c["pools"]["decode"].update(replica=2)),
        ["pools.decode.replica", "unknown field"],
    ),
    "replicas above max": (
        with_(lambda c: c["pools"]["decode"].update(replicas=5)),
        ["pools.decode", "max_replicas"],
    ),
    "scale on GPU utilisation": (
        with_(lambda c: c["pools"]["decode"]["autoscaling"].update(signal="gpu_utilization")),
        ["pools.decode.autoscaling.signal", "utilisation", "kv_cache_usage"],
    ),
    "prefill on KV usage": (
        with_(lambda c: c["pools"]["prefill"]["autoscaling"].update(signal="kv_cache_usage")),
        ["pools.prefill.autoscaling.signal", "queued_prompt_tokens"],
    ),
    "negative target": (
        with_(lambda c: c["pools"]["decode"]["autoscaling"].update(target=-1)),
        ["pools.decode.autoscaling.target", "greater than 0"],
    ),
    "unknown transport": (
        with_(lambda c: c.update(kv_transport="carrier-pigeon")),
        ["kv_transport", "grpc", "ray"],
    ),
    "no decode pool": (
        with_(lambda c: c["pools"].pop("decode")),
        ["prefill and decode", "colocated"],
    ),
    "a string for a number": (
        with_(lambda c: c["pools"]["prefill"]["engine"].update(kv_cache_mib="lots")),
        ["pools.prefill.engine.kv_cache_mib"],
    ),
    "two ways to give the key": (
        with_(lambda c: c["router"].update(api_key="k", api_key_env="KEY")),
        ["router", "api_key or api_key_env"],
    ),
    "port out of range": (
        with_(lambda c: c["router"].update(port=70000)),
        ["router.port"],
    ),
    "negative migration limit": (
        with_(lambda c: c["router"].update(migration_limit=-1)),
        ["router.migration_limit"],
    ),
    "zero request timeout": (
        with_(lambda c: c["router"].update(request_timeout_s=0)),
        ["router.request_timeout_s"],
    ),
}
