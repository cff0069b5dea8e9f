"""splitserve on Ray Serve: one application built from one scaling config.

    Router     the ingress: the same FastAPI router as `splitserve serve`,
               behind Serve's HTTP proxy
    Prefill    } one deployment per pool, each placed by its own resources
    Decode     } and scaled by its own policy (deploy/ray_autoscale.py)
    Colocated  }
    Directory  where each worker's gRPC endpoint is (one replica, no CPU)

Every worker replica (deploy/ray_replicas.py) runs the same engine and the
same gRPC servicer as a standalone worker process, on the node's address; it
registers in the Directory, and the router (deploy/ray_ingress.py) finds the
workers there (and so follows scaling).
KV moves between pools over gRPC, or, with `kv_transport: ray`, through the
object store: the decode replica calls the prefill deployment's handle and
gets the first token, then the KV as numpy arrays that Ray stores once and
the decode replica owns (see docs/ray.md).

Workers let in only the cluster: every replica's gRPC port requires the
secret in $SPLITSERVE_CLUSTER_SECRET (and mTLS with $SPLITSERVE_TLS_*), which
`splitserve up` sets in the job's runtime_env and KubeRay pods take from a
Secret; the router ingress presents it. A decode replica dials only the
prefill replicas in the Directory.

Scale-down drains: Serve stops routing to the replica it picked, then calls
its `__del__`, which leaves the Directory (the router stops sending within a
poll), refuses the stragglers with UNAVAILABLE (the router or the decode
worker retries elsewhere: nothing has reached the client yet), waits for its
requests in flight to finish, and only then stops.

    serve.run(build_app(config), name=APP_NAME, route_prefix="/")

KubeRay and `serve deploy` reach the same builder through `app_builder`
(import path `deploy.ray_app:app_builder`, argument `config`: the YAML's path
or its contents as a mapping).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from deploy.config import ClusterConfig, Pool, load_config
from deploy.ray_ingress import RouterIngress
from deploy.ray_replicas import DecodeReplica, Directory, PrefillReplica

APP_NAME = "splitserve"
# How often replicas push their load to Serve's autoscaler; Serve's default
# (10 s) makes a scale-up take over 12 s (measured on the 2-core test machine).
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


def deployment_options(pool: Pool, name: str) -> dict[str, Any]:
    """Serve options for one pool: placement by its resources, and either a
    fixed size or autoscaling on the pool's own signal."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {
            "num_cpus": pool.resources.num_cpus,
            "num_gpus": pool.resources.num_gpus,
        },
        # Requests reach workers over gRPC or as prefill calls; neither should
        # wait in Serve's queue where the engine's scheduler cannot see it.
        "max_ongoing_requests": 1024,
        "graceful_shutdown_timeout_s": pool.drain_timeout_s + 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
    }
    lo = pool.min_replicas if pool.min_replicas is not None else pool.replicas
    hi = pool.max_replicas if pool.max_replicas is not None else pool.replicas
    auto = pool.autoscaling
    if auto is None or lo == hi:
        options["num_replicas"] = pool.replicas
        return options
    options["autoscaling_config"] = AutoscalingConfig(
        min_replicas=lo,
        max_replicas=hi,
        initial_replicas=pool.replicas,
        upscale_delay_s=auto.upscale_delay_s,
        downscale_delay_s=auto.downscale_delay_s,
        metrics_interval_s=METRICS_INTERVAL_S,
        look_back_period_s=LOOK_BACK_PERIOD_S,
        policy=AutoscalingPolicy(
            policy_function="deploy.ray_autoscale:PoolScaler",
            policy_kwargs={"signal": auto.signal, "target": auto.target},
        ),
    )
    return options


def _deployment(cls: type, **options: Any) -> Any:
    return serve.deployment(**options)(cls)


def build_app(config: ClusterConfig) -> Any:
    """The Serve application for `config` (pass to serve.run)."""
    directory = _deployment(
        Directory, name="Directory", num_replicas=1, ray_actor_options={"num_cpus": 0}
    ).bind()
    pools = config.pools
    if pools.colocated is not None:
        colocated = _deployment(
            DecodeReplica, **deployment_options(pools.colocated, "Colocated")
        ).bind(config, directory)
        workers = [colocated]
    else:
        assert pools.prefill is not None and pools.decode is not None
        prefill = _deployment(PrefillReplica, **deployment_options(pools.prefill, "Prefill")).bind(
            config, directory
        )
        decode = _deployment(DecodeReplica, **deployment_options(pools.decode, "Decode")).bind(
            config, directory, prefill if config.kv_transport == "ray" else None
        )
        workers = [prefill, decode]
    # The router does not call the workers through Serve (it speaks gRPC to
    # the addresses in the Directory), but binding them here makes every pool
    # part of the one application, deployed and deleted with it.
    router = _deployment(
        RouterIngress,
        name="Router",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096,
    )
    return router.bind(config, directory, workers)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run deploy.ray_app:app_builder config=...` and KubeRay's
    serveConfigV2: `config` is a YAML path or the config as a mapping."""
    raw = args.get("config")
    if isinstance(raw, str):
        return build_app(load_config(raw))
    if isinstance(raw, dict):
        return build_app(ClusterConfig.model_validate(raw))
    raise ValueError("app_builder needs `config`: a YAML path or the config as a mapping")
