"""What every worker process does around its engine: the common command-line
options, log setup, the engine on its thread with per-step metrics, the
Prometheus endpoint, the ready file a launcher waits on, gRPC health checking,
and running until SIGTERM/SIGINT or until the engine dies: `serve_role`, the
one boot/serve/drain path of both roles. What a role serves (its servicer)
stays in its own package.

A worker whose engine thread died is of no use to anyone: every request it
held has already ended with an error (engine/async_engine.py), so the process
exits with EXIT_ENGINE_DIED and its supervisor (`splitserve serve`,
Kubernetes) starts a new one. Never a live process that refuses all work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from engine.args import add_engine_args, engine_config_from_args
from engine.async_engine import AsyncEngine, StepInfo
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.metrics import EngineMetrics
from kvtransfer.channels import SERVER_OPTIONS
from kvtransfer.security import ClusterSecurity, add_port, make_server, warn_if_open

log = logging.getLogger("splitserve")

# The exit code of a worker whose engine died (EX_SOFTWARE), for its
# supervisor to restart it. 0: it was asked to stop; 2: a bad option or model.
EXIT_ENGINE_DIED = 70
# After the engine died, the event loop has this long to send the error
# status of every open stream before the orderly shutdown begins...
FATAL_GRACE_S = 0.5
# ...and the process ends this long after the death, whatever still runs (a
# gRPC server that does not stop, a thread that does not end).
FATAL_DEADLINE_S = 5.0
# A fault-injection hook for tests and chaos drills: when set (to N > 0), the
# engine thread raises after its Nth step, as a real engine bug would. Read
# once, when the engine is created; never set it in production.
FAULT_STEP_ENV = "SPLITSERVE_FAULT_ENGINE_STEP"
# The grpc.health.v1 service that stays SERVING while the worker drains (the
# liveness probe: restarting a draining worker would cut its streams). The
# overall service "" and the role's own gRPC service are the readiness ones.
LIVENESS_SERVICE = "liveness"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """Options every worker takes: where to serve, metrics, ready file, the engine."""
    p.add_argument("--host", default="127.0.0.1", help="address to serve gRPC and /metrics on")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    p.add_argument(
        "--advertise-host",
        help="the address others reach this worker at, shown in its Status and timings "
        "(default: --host, or this machine's address when --host is 0.0.0.0 or ::; on "
        "Kubernetes pass the pod IP)",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: free, -1: off)")
    p.add_argument("--ready-file", help="write {address, pid, metrics_port} JSON here when ready")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to wait for requests in flight to finish (new ones are "
        "refused so the router sends them elsewhere) before exiting",
    )
    p.add_argument(
        "--price-per-hour",
        type=float,
        default=0.0,
        help="what this worker costs per hour (USD), for the tokens-per-dollar metrics",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_engine_args(p)


def run_worker_main(
    prog: str,
    role: str,
    args: argparse.Namespace,
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, int | None]],
) -> int:
    """Run `serve(args)` to completion; its result is the exit code
    (WorkerLife.exit_code). A bad model or option is one line on stderr and
    exit code 2, not a traceback."""
    setup_logging(role, args.verbose)
    try:
        code = asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


def setup_logging(name: str, verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {name}[{os.getpid()}]: %(message)s",
        datefmt="%H:%M:%S",
    )


def load_engine(
    config: EngineConfig,
    metrics: EngineMetrics,
    *,
    threads: int = 0,
    price_per_hour: float = 0.0,
    on_fatal: Callable[[str], None] | None = None,
) -> AsyncEngine:
    """The engine `config` describes, on its own thread (not started yet),
    feeding the per-step metrics; `threads`: torch's CPU threads (0: its
    default); `price_per_hour` prices the replica's tokens; `on_fatal(message)`
    runs if the engine thread dies (WorkerLife.engine_died in a standalone
    worker; a Ray replica fails its health check instead). Call from the
    running event loop."""
    fault_step = _fault_step()
    if price_per_hour < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    metrics.cost.price_per_hour = price_per_hour
    if threads:
        import torch

        torch.set_num_threads(threads)
    steps = 0

    def on_step(step: StepInfo) -> None:
        nonlocal steps
        metrics.observe_step(step)
        metrics.observe_snapshot(aengine.snapshot)
        steps += 1
        if fault_step is not None and steps >= fault_step:
            # Raised on the engine thread, after the step: it dies as it would of a bug.
            raise RuntimeError(f"fault injected after {steps} engine steps ({FAULT_STEP_ENV})")

    if fault_step is not None:
        log.warning("%s=%d: the engine will die after that many steps", FAULT_STEP_ENV, fault_step)
    aengine = AsyncEngine.build(
        lambda: LLMEngine(config), asyncio.get_running_loop(), on_step=on_step, on_fatal=on_fatal
    )
    log.info("dtype: %s", aengine.config.dtype_choice(aengine.model_config).describe())
    return aengine


def _fault_step() -> int | None:
    value = os.environ.get(FAULT_STEP_ENV, "").strip()
    if not value:
        return None
    try:
        step = int(value)
    except ValueError:
        step = 0
    if step < 1:
        raise ValueError(f"{FAULT_STEP_ENV} must be a positive integer, got {value!r}")
    return step


def advertised_address(args: argparse.Namespace, port: int) -> str:
    """host:port for others to dial: never a wildcard address."""
    host = args.advertise_host or args.host
    if host in ("0.0.0.0", "::", "[::]", ""):
        import socket

        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on host:port (0 picks a free port); the port, or 0 when
    disabled (port < 0)."""
    if port < 0:
        return 0
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


class WorkerLife:
    """How a standalone worker process lives and ends, and what it tells its
    supervisor: grpc.health.v1 on its gRPC port, and its exit code.

    It serves until SIGTERM/SIGINT (then it drains and exits 0) or until its
    engine dies (then it exits EXIT_ENGINE_DIED, after FATAL_GRACE_S for the
    open streams' error statuses to go out, and at the latest FATAL_DEADLINE_S
    after the death). Health, per service:

    - "" and the role's gRPC service (e.g. "splitserve.v1.DecodeWorker"):
      SERVING while the engine is alive and the worker takes requests;
      NOT_SERVING while it starts, drains, or once its engine died (readiness);
    - "liveness": SERVING from start until the engine dies, draining included.

    Create it on the running event loop.
    """

    def __init__(self, service: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()  # set: leave announce_and_wait and shut down
        self.exit_code = 0
        self.health = health.aio.HealthServicer()
        self._ready = (health.OVERALL_HEALTH, service)
        self._dead = False  # set on the loop once the engine died
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until the process ends

    async def attach(self, server: grpc.aio.Server) -> None:
        """Serve grpc.health.v1 on `server`; not ready until announce_and_wait."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set(self._ready, _NOT_SERVING)
        await self._set([LIVENESS_SERVICE], _SERVING)

    async def announce_and_wait(
        self, args: argparse.Namespace, role: str, address: str, metrics_port: int
    ) -> None:
        """Write the ready file, report SERVING, then wait for SIGTERM or
        SIGINT or the engine's death; health is NOT_SERVING on return."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        _write_ready_file(
            args.ready_file,
            {"role": role, "address": address, "pid": os.getpid(), "metrics_port": metrics_port},
        )
        if not self._dead:
            await self._set(self._ready, _SERVING)
            log.info("%s worker serving on %s (metrics on :%d)", role, address, metrics_port)
        await self.stop.wait()
        await self._set(self._ready, _NOT_SERVING)  # readiness fails: no new requests
        log.info("shutting down")

    def drain_timeout(self, timeout_s: float) -> float:
        """How long to wait for requests in flight: after the engine died
        they have all ended already, so no longer than the grace."""
        return min(timeout_s, FATAL_GRACE_S) if self._dead else timeout_s

    def engine_died(self, message: str) -> None:
        """The engine's on_fatal: runs on the engine thread once it died,
        after every request it held has been failed."""
        self.exit_code = EXIT_ENGINE_DIED
        log.critical(
            "%s; this worker exits with code %d so that its supervisor starts a new one",
            message,
            EXIT_ENGINE_DIED,
        )
        # The hard stop first: it holds whatever happens to the event loop.
        threading.Thread(
            target=_exit_after, args=(FATAL_DEADLINE_S,), name="fatal-exit", daemon=True
        ).start()
        # A closed loop raises RuntimeError: the hard stop then ends the process.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._begin_exit)

    def _begin_exit(self) -> None:
        self._dead = True
        self._tasks.add(
            self.loop.create_task(self._set([*self._ready, LIVENESS_SERVICE], _NOT_SERVING))
        )
        # The error deltas were queued before this callback: FATAL_GRACE_S
        # lets their streams send the error status before the server stops.
        self.loop.call_later(FATAL_GRACE_S, self.stop.set)

    async def _set(self, services: Iterable[str], status: Any) -> None:
        for service in services:
            await self.health.set(service, status)


def _exit_after(delay_s: float) -> None:
    """End the process with EXIT_ENGINE_DIED `delay_s` from now, unless it
    has exited by then (this thread is a daemon)."""
    time.sleep(delay_s)
    log.error("still running %.0fs after the engine died: exiting now", delay_s)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_ENGINE_DIED)


async def drain(busy: Callable[[], int], timeout_s: float, poll_s: float = 0.05) -> int:
    """Wait until `busy()` (requests in flight) is 0 or `timeout_s` passed;
    returns what was still in flight. The caller has already stopped taking
    new requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if busy():
        log.info("draining: %d requests in flight", busy())
    while busy() and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    left = busy()
    if left:
        log.warning("drain timed out with %d requests in flight", left)
    return left


def _write_ready_file(path: str | None, info: dict[str, Any]) -> None:
    """Atomically write the JSON a launcher polls for (address, pid, ...)."""
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


@dataclass(frozen=True)
class RoleSpec:
    """What a role brings to serve_role: its name and gRPC service, its
    metrics (`.engine` for the engine's, `.registry` to export), how to build
    its servicer and add it to the server, what counts as work in flight
    (drained on SIGTERM), and what to close after the server stopped."""

    name: str  # "prefill", "decode" or "colocated"
    service: str  # the gRPC service's full name, for health checking
    metrics: Any
    make_servicer: Callable[[AsyncEngine, str, int, ClusterSecurity], Any]
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    in_flight: Callable[[Any], int]
    close: Callable[[Any], Coroutine[Any, Any, None]] | None = None


async def serve_role(args: argparse.Namespace, role: RoleSpec) -> int:
    """Serve until SIGTERM (drain, then 0) or the engine's death (EXIT_ENGINE_DIED)."""
    life = WorkerLife(role.service)
    security = ClusterSecurity.from_args(args)
    aengine = load_engine(
        engine_config_from_args(args),
        role.metrics.engine,
        threads=args.threads,
        price_per_hour=args.price_per_hour,
        on_fatal=life.engine_died,
    )
    server = make_server(security, SERVER_OPTIONS)
    await life.attach(server)
    address = advertised_address(args, add_port(server, f"{args.host}:{args.port}", security))
    warn_if_open(security, f"the {role.name} worker's gRPC port", address)
    metrics_port = start_metrics_server(role.metrics.registry, args.metrics_port, host=args.host)
    servicer = role.make_servicer(aengine, address, metrics_port, security)
    role.add_to_server(servicer, server)
    aengine.start()
    await server.start()
    await life.announce_and_wait(args, role.name, address, metrics_port)
    servicer.draining = True
    await drain(lambda: role.in_flight(servicer), life.drain_timeout(args.drain_timeout))
    await server.stop(grace=1.0)
    if role.close is not None:
        await role.close(servicer)
    aengine.stop()
    return life.exit_code
