"""The per-pool scaling config: one YAML file that sizes a cluster.

Validated by pydantic at load time, before anything starts; every error
names the field (dotted path) and says how to fix it. Examples with every
field commented: deploy/examples/*.yaml.

    from deploy.config import load_config
    config = load_config("deploy/examples/laptop.yaml")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config import DEFAULT_KV_CACHE_MIB, EngineConfig, engine_default
from router.selection import DEFAULT_LOCAL_PREFILL_THRESHOLD

# What each pool may scale on. Never utilisation: a decode pool at 100% GPU
# can still have room in its batch, and a prefill pool at 30% can have a
# queue that blows every TTFT.
POOL_SIGNALS = {
    "prefill": ("queued_prompt_tokens", "waiting_requests"),
    "decode": ("kv_cache_usage", "waiting_requests"),
    "colocated": ("kv_cache_usage", "waiting_requests", "queued_prompt_tokens"),
}
UTILISATION_WORDS = ("util", "cpu", "gpu", "busy")


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions allowed)")


class EngineLimits(_Strict):
    max_num_batched_tokens: int = Field(
        engine_default("max_num_batched_tokens"), ge=1, description="token budget of one step"
    )
    max_num_seqs: int = Field(
        engine_default("max_num_seqs"), ge=1, description="cap on the running batch"
    )
    kv_cache_mib: int = Field(DEFAULT_KV_CACHE_MIB, ge=1, description="KV cache memory per replica")
    max_model_len: int | None = Field(None, ge=2, description="context length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    prefix_caching: bool = Field(
        engine_default("enable_prefix_caching"),
        description="reuse the KV of full blocks a prompt shares with an earlier one",
    )


class Autoscaling(_Strict):
    signal: str = Field(description="what the pool scales on (see POOL_SIGNALS)")
    target: float = Field(gt=0, description="per-replica value the autoscaler aims for")
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)


class Pool(_Strict):
    replicas: int = Field(1, ge=0, description="replicas at start")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    resources: Resources = Field(default_factory=Resources)
    engine: EngineLimits = Field(default_factory=EngineLimits)
    autoscaling: Autoscaling | None = None
    price_per_replica_hour: float = Field(0.0, ge=0, description="for tokens per dollar")
    drain_timeout_s: float = Field(
        60.0, gt=0, description="on scale-down, how long a replica may finish its requests"
    )

    @model_validator(mode="after")
    def _bounds(self) -> Pool:
        lo = self.min_replicas if self.min_replicas is not None else self.replicas
        hi = self.max_replicas if self.max_replicas is not None else self.replicas
        if not lo <= self.replicas <= hi:
            raise ValueError(
                f"replicas ({self.replicas}) must lie within min_replicas ({lo}) and "
                f"max_replicas ({hi}); raise max_replicas or lower replicas"
            )
        return self


class Router(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="if set, clients must send it as a Bearer token")
    api_key_env: str | None = Field(
        None, description="or: the environment variable that holds the key (e.g. from a Secret)"
    )
    policy: Literal["cache_aware", "least_loaded", "round_robin"] = "cache_aware"
    request_timeout_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="end-to-end limit per request (504 past it)"
    )
    migration_limit: int = Field(
        3, ge=0, description="times a stream may move off a failed decode worker (0: never)"
    )
    local_prefill_threshold: int = Field(
        DEFAULT_LOCAL_PREFILL_THRESHOLD,
        ge=0,
        description="prefill on the decode worker when it lacks at most this many prompt tokens",
    )
    tool_call_parser: Literal["hermes", "llama3_json"] = Field(
        "hermes", description="how tool calls are read from an answer (router/tools.py)"
    )

    @model_validator(mode="after")
    def _one_key(self) -> Router:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("router: give api_key or api_key_env, not both")
        return self

    @property
    def resolved_api_key(self) -> str | None:
        """The key, read from the environment where the router runs."""
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(
                    f"router.api_key_env: the environment variable {self.api_key_env} is not set"
                )
            return key
        return self.api_key


class Pools(_Strict):
    prefill: Pool | None = None
    decode: Pool | None = None
    colocated: Pool | None = None


class ClusterConfig(_Strict):
    model: str | None = Field(None, description="local model directory; none: the built-in one")
    kv_transport: Literal["grpc", "ray"] = "grpc"
    router: Router = Field(default_factory=Router)
    pools: Pools

    @model_validator(mode="after")
    def _pools(self) -> ClusterConfig:
        p = self.pools
        if p.colocated is None and (p.prefill is None or p.decode is None):
            raise ValueError("pools: give both prefill and decode (disaggregated), or colocated")
        for name in ("prefill", "decode", "colocated"):
            pool = getattr(p, name)
            if pool is None or pool.autoscaling is None:
                continue
            signal = pool.autoscaling.signal
            allowed = POOL_SIGNALS[name]
            if signal not in allowed:
                why = (
                    "utilisation says nothing about queues or KV room; "
                    if any(w in signal.lower() for w in UTILISATION_WORDS)
                    else ""
                )
                raise ValueError(
                    f"pools.{name}.autoscaling.signal: {signal!r} is not allowed; {why}"
                    f"use one of {', '.join(allowed)}"
                )
        return self

    @property
    def model_path(self) -> str | None:
        return str(Path(self.model).expanduser()) if self.model else None


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a config file; ConfigError names every bad field."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top (model, pools, ...)")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from e


def _describe(err: object) -> str:
    assert isinstance(err, dict)
    where = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (check the spelling against deploy/examples/)"
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def pool_engine_args(
    config: ClusterConfig, pool: Pool, role: str, include_model: bool = True
) -> list[str]:
    """A worker's command-line options for one pool (the same options on Ray
    replicas, local processes and Kubernetes pods)."""
    e = pool.engine
    args = ["--kv-cache-mib", str(e.kv_cache_mib), "--max-num-seqs", str(e.max_num_seqs)]
    args += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    # Only when the file sets them: `splitserve serve --dtype/--threads` apply otherwise.
    if "dtype" in e.model_fields_set:
        args += ["--dtype", e.dtype]
    if "threads" in e.model_fields_set:
        args += ["--threads", str(e.threads)]
    if not e.prefix_caching:
        args.append("--no-prefix-caching")
    args += ["--drain-timeout", str(pool.drain_timeout_s)]
    args += ["--price-per-hour", str(pool.price_per_replica_hour)]
    if e.max_model_len is not None:
        args += ["--max-model-len", str(e.max_model_len)]
    if include_model and config.model_path is not None:
        args += ["--model", config.model_path]
    if role == "colocated":
        args.append("--colocated")
    return args


def pool_engine_config(config: ClusterConfig, pool: Pool) -> EngineConfig:
    """The engine one pool's replicas run (what pool_engine_args says on a
    command line, for a Ray replica that builds its engine in process); the
    built-in model when the config names none."""
    e = pool.engine
    model = config.model_path
    if model is None:
        from modelmaker import ensure_default_model

        model = str(ensure_default_model())
    return EngineConfig(
        model=model,
        dtype=e.dtype,
        kv_cache_bytes=e.kv_cache_mib * 2**20,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_model_len=e.max_model_len,
        enable_prefix_caching=e.prefix_caching,
    )
