"""The worker replicas of the Ray Serve application, and the Directory
where they say where their gRPC endpoints are.

Every worker replica runs the same engine and the same gRPC servicer as a
standalone worker process (worker/process.py's load_engine and drain), on
the node's address; it registers in the Directory and heartbeats, and the
router finds the workers there (and so follows scaling). KV moves between
pools over gRPC, or, with `kv_transport: ray`, through the object store
(kvtransfer/ray_backend.py): the decode replica calls the prefill
deployment's handle.
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
from ray.serve.handle import DeploymentHandle

from deploy.config import ClusterConfig, Pool, pool_engine_config

log = logging.getLogger("splitserve.ray")

# Seconds without a heartbeat after which the Directory forgets a worker
# (one that crashed cannot say goodbye).
DIRECTORY_TTL_S = 30.0
HEARTBEAT_S = 2.0


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
        await wait_uncancelled(self.directory.register.remote(self.role, self.address), 30.0)
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("%s replica serving on %s", self.role, self.address)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(Exception):  # the Directory restarting: try again
                await wait_uncancelled(
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
            await wait_uncancelled(self.directory.deregister.remote(self.address), 1.0)
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
        from decode_worker.options import DecodeOptions
        from decode_worker.server import DecodeServicer
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
        workers = await wait_uncancelled(self.directory.workers.remote(), 2.0)
        return [address for address, role in workers.items() if role == "prefill"]


# Tasks left to finish on their own (a reference keeps them from being collected).
_running: set[asyncio.Task[Any]] = set()


def keep_running(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def wait_uncancelled(awaitable: Any, timeout_s: float) -> Any:
    """Await a handle call for at most `timeout_s` (TimeoutError after it)
    without ever cancelling it: a timed-out call finishes in the background.
    Cancelling a Ray call whose result is being fetched from the object
    store crashes the process (see kvtransfer/ray_backend.py)."""
    task = keep_running(_awaited(awaitable))
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    return task.result()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _channel_options() -> list[tuple[str, Any]]:
    from kvtransfer.grpc_backend import CHANNEL_OPTIONS

    return list(CHANNEL_OPTIONS)
