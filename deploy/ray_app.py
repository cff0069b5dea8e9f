"""splitserve on Ray Serve: one application built from one scaling config.

    Router     the ingress: the same FastAPI router as `splitserve serve`,
               behind Serve's HTTP proxy
    Prefill    } one deployment per pool, each placed by its own resources
    Decode     } and scaled by its own policy (deploy/ray_autoscale.py)
    Colocated  }
    Directory  where each worker's gRPC endpoint is (one replica, no CPU)

Every worker replica runs the same engine and the same gRPC servicer as a
standalone worker process, on the node's address; it registers in the
Directory, and the router finds the workers there (and so follows scaling).
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

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
from ray.serve.handle import DeploymentHandle

from deploy.config import ClusterConfig, Pool, load_config, pool_engine_config

log = logging.getLogger("splitserve.ray")

APP_NAME = "splitserve"
# Seconds without a heartbeat after which the Directory forgets a worker
# (one that crashed cannot say goodbye).
DIRECTORY_TTL_S = 30.0
HEARTBEAT_S = 2.0
# How often replicas push their load to Serve's autoscaler; Serve's default
# (10 s) makes a scale-up take over 12 s (measured on the 2-core test machine).
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


class Directory:
    """Which worker serves gRPC where: address -> (role, last heartbeat)."""

    def __init__(self) -> None:
        self._workers: dict[str, tuple[str, float]] = {}

    def register(self, role: str, address: str) -> None:
        self._workers[address] = (role, time.monotonic())

    def deregister(self, address: str) -> None:
        self._workers.pop(address, None)

    def workers(self) -> dict[str, str]:
        now = time.monotonic()
        for address, (_, seen) in list(self._workers.items()):
            if now - seen > DIRECTORY_TTL_S:
                del self._workers[address]
        return {address: role for address, (role, _) in self._workers.items()}


class _WorkerReplica(abc.ABC):
    """What every worker replica does around its role's servicer: boot the
    engine and gRPC server, heartbeat to the Directory, report load to the
    autoscaler, drain on scale-down."""

    role = ""

    async def _boot(self, config: ClusterConfig, pool: Pool, directory: DeploymentHandle) -> None:
        from kvtransfer.security import ClusterSecurity, add_port, make_server, warn_if_open
        from worker.process import load_engine, setup_logging, start_metrics_server

        setup_logging(self.role)
        self.config = config
        self.pool = pool
        self.directory = directory
        self.metrics = self._make_metrics()
        self.aengine = load_engine(
            pool_engine_config(config, pool),
            self.metrics.engine,
            threads=pool.engine.threads,
            price_per_hour=pool.price_per_replica_hour,
        )
        host = ray.util.get_node_ip_address()
        self.security = ClusterSecurity.from_env()
        self.server = make_server(self.security, _channel_options())
        self.address = f"{host}:{add_port(self.server, f'{host}:0', self.security)}"
        warn_if_open(self.security, f"the {self.role} replica's gRPC port", self.address)
        self.metrics_port = start_metrics_server(self.metrics.registry, 0, host=host)
        self.servicer = self._make_servicer()
        self.aengine.start()
        await self.server.start()
        # Bounded like every directory call (a replica that cannot register fails to start).
        await _wait_uncancelled(self.directory.register.remote(self.role, self.address), 30.0)
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("%s replica serving on %s", self.role, self.address)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(Exception):  # the Directory restarting: try again
                await _wait_uncancelled(
                    self.directory.register.remote(self.role, self.address), HEARTBEAT_S
                )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load, per signal (deploy/config.py POOL_SIGNALS)."""
        snap = self.aengine.snapshot
        return {
            "queued_prompt_tokens": float(snap.waiting_prompt_tokens),
            "waiting_requests": float(snap.waiting + snap.awaiting_kv),
            "kv_cache_usage": snap.kv_usage,
        }

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s. A replica whose
        engine died (every request it held has already ended with an error)
        raises, and Serve replaces it: the Ray form of a standalone worker
        exiting with EXIT_ENGINE_DIED."""
        if self.aengine.error is not None:
            raise RuntimeError(self.aengine.error)

    async def __del__(self) -> None:
        """Scale-down (or shutdown): drain, then stop. Serve calls it once."""
        from worker.process import drain

        self._heartbeat.cancel()
        # Bounded: on `serve.delete` the Directory may already be gone, and a
        # handle call would wait for it forever.
        with contextlib.suppress(Exception):
            await _wait_uncancelled(self.directory.deregister.remote(self.address), 1.0)
        # Requests the router sent before its next poll still arrive; they
        # are refused from here on and retried elsewhere.
        await asyncio.sleep(1.0)
        self.servicer.draining = True
        left = await drain(self._in_flight, self.pool.drain_timeout_s)
        log.info("%s replica %s drained (%d left)", self.role, self.address, left)
        await self.server.stop(grace=1.0)
        self.aengine.stop()

    # -- per role --------------------------------------------------------------

    @abc.abstractmethod
    def _make_metrics(self) -> Any:
        """The role's Prometheus metrics."""

    @abc.abstractmethod
    def _make_servicer(self) -> Any:
        """The role's gRPC servicer, added to self.server."""

    @abc.abstractmethod
    def _in_flight(self) -> int:
        """Requests in flight now (a draining replica waits for 0)."""


class PrefillReplica(_WorkerReplica):
    role = "prefill"

    async def __init__(self, config: ClusterConfig, directory: DeploymentHandle) -> None:  # type: ignore[misc]  # Serve awaits it
        assert config.pools.prefill is not None
        await self._boot(config, config.pools.prefill, directory)

    def _make_metrics(self) -> Any:
        from prefill_worker.metrics import PrefillMetrics

        return PrefillMetrics()

    def _make_servicer(self) -> Any:
        from prefill_worker.server import DEFAULT_KV_LEASE_S, PrefillServicer
        from protos import splitserve_pb2_grpc as pb_grpc

        servicer = PrefillServicer(
            self.aengine, self.metrics, self.address, self.metrics_port, DEFAULT_KV_LEASE_S
        )
        pb_grpc.add_PrefillWorkerServicer_to_server(servicer, self.server)
        return servicer

    def _in_flight(self) -> int:
        return int(self.servicer.num_calls)

    async def prefill(self, request: bytes) -> AsyncIterator[Any]:
        """The object-store transport: the serialized FirstToken, then the KV."""
        async for item in self.servicer.prefill_to_object_store(request):
            yield item


class DecodeReplica(_WorkerReplica):
    role = "decode"

    async def __init__(  # type: ignore[misc]  # Serve awaits it
        self,
        config: ClusterConfig,
        directory: DeploymentHandle,
        prefill: DeploymentHandle | None = None,
    ) -> None:
        self.prefill_handle = prefill
        pool = config.pools.colocated or config.pools.decode
        assert pool is not None
        if config.pools.colocated is not None:
            self.role = "colocated"
        await self._boot(config, pool, directory)

    def _make_metrics(self) -> Any:
        from decode_worker.metrics import DecodeMetrics

        return DecodeMetrics(self.role)

    def _make_servicer(self) -> Any:
        from decode_worker.server import DecodeOptions, DecodeServicer
        from kvtransfer.fetch import PrefillTransport
        from kvtransfer.grpc_backend import GrpcPrefill
        from kvtransfer.peers import KnownPeers
        from kvtransfer.ray_backend import ObjectStorePrefill
        from protos import splitserve_pb2_grpc as pb_grpc

        # gRPC: only the prefill replicas in the Directory are ever dialled.
        transport: PrefillTransport = GrpcPrefill(
            self.security,
            KnownPeers(source=self._prefill_members),
            on_unknown=lambda _: self.metrics.prefill_unknown.inc(),
        )
        if self.config.kv_transport == "ray" and self.prefill_handle is not None:
            transport = ObjectStorePrefill.through(self.prefill_handle)
        servicer = DecodeServicer(
            self.aengine,
            self.metrics,
            self.address,
            self.metrics_port,
            colocated=self.role == "colocated",
            options=DecodeOptions(),
            prefill_transport=transport,
        )
        pb_grpc.add_DecodeWorkerServicer_to_server(servicer, self.server)
        return servicer

    def _in_flight(self) -> int:
        return int(self.servicer.num_streams)

    async def _prefill_members(self) -> list[str]:
        """The prefill replicas registered in the Directory now."""
        workers = await _wait_uncancelled(self.directory.workers.remote(), 2.0)
        return [address for address, role in workers.items() if role == "prefill"]


@serve.ingress()
class RouterIngress:
    """The HTTP API; finds the workers in the Directory at every poll."""

    def __init__(
        self, config: ClusterConfig, directory: DeploymentHandle, pools: list[DeploymentHandle]
    ) -> None:
        self.config = config
        self.directory = directory
        self.pools = pools  # held only so the pools belong to this application

    async def _discover(self) -> tuple[list[str], list[str]]:
        workers = await _wait_uncancelled(self.directory.workers.remote(), 2.0)
        decode = sorted(a for a, role in workers.items() if role in ("decode", "colocated"))
        prefill = sorted(a for a, role in workers.items() if role == "prefill")
        return decode, prefill

    def __serve_build_asgi_app__(self) -> Any:
        from kvtransfer.security import ClusterSecurity
        from router.server import RouterConfig, build_app

        model = self.config.model_path
        if model is None:
            from engine.builtin_model import ensure_default_model

            model = str(ensure_default_model())
        return build_app(
            RouterConfig(
                model=model,
                api_key=self.config.router.resolved_api_key,
                policy=self.config.router.policy,
                request_timeout_s=self.config.router.request_timeout_s,
                migration_limit=self.config.router.migration_limit,
                max_model_len=_max_model_len(self.config),
                discover=self._discover,
                security=ClusterSecurity.from_env(),
            )
        )


# Tasks left to finish on their own (a reference keeps them from being collected).
_running: set[asyncio.Task[Any]] = set()


def _keep_running(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def _wait_uncancelled(awaitable: Any, timeout_s: float) -> Any:
    """Await a handle call for at most `timeout_s` (TimeoutError after it)
    without ever cancelling it: a timed-out call finishes in the background.
    Cancelling a Ray call whose result is being fetched from the object
    store crashes the process (see kvtransfer/ray_backend.py)."""
    task = _keep_running(_awaited(awaitable))
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    return task.result()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _max_model_len(config: ClusterConfig) -> int | None:
    pools = [p for p in (config.pools.prefill, config.pools.decode, config.pools.colocated) if p]
    lengths = [p.engine.max_model_len for p in pools if p.engine.max_model_len is not None]
    return min(lengths) if lengths else None


def _channel_options() -> list[tuple[str, Any]]:
    from kvtransfer.grpc_backend import CHANNEL_OPTIONS

    return list(CHANNEL_OPTIONS)


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
