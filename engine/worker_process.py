"""What every worker process does around its engine: the common command-line
options, log setup, the engine on its thread with per-step metrics, the
Prometheus endpoint, the ready file a launcher waits on, and running until
SIGTERM/SIGINT. The gRPC server itself stays in each role's package."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from engine.args import add_engine_args, engine_config_from_args
from engine.async_engine import AsyncEngine, StepInfo
from engine.llm_engine import LLMEngine
from engine.metrics import EngineMetrics

log = logging.getLogger("splitserve")


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
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
) -> int:
    """Run `serve(args)` to completion; a bad model or option is one line on
    stderr and exit code 2, not a traceback."""
    setup_logging(role, args.verbose)
    try:
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def setup_logging(name: str, verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {name}[{os.getpid()}]: %(message)s",
        datefmt="%H:%M:%S",
    )


def load_engine(args: argparse.Namespace, metrics: EngineMetrics) -> AsyncEngine:
    """The engine the options describe, on its own thread (not started yet),
    feeding the per-step metrics. Call from the running event loop."""
    engine = LLMEngine(engine_config_from_args(args))
    if args.price_per_hour < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    metrics.cost.price_per_hour = args.price_per_hour

    def on_step(step: StepInfo) -> None:
        metrics.observe_step(step)
        metrics.observe_snapshot(aengine.snapshot)

    aengine = AsyncEngine(engine, asyncio.get_running_loop(), on_step=on_step)
    return aengine


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


async def announce_and_wait(
    args: argparse.Namespace, role: str, address: str, metrics_port: int
) -> None:
    """Write the ready file, then wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _write_ready_file(
        args.ready_file,
        {"role": role, "address": address, "pid": os.getpid(), "metrics_port": metrics_port},
    )
    log.info("%s worker serving on %s (metrics on :%d)", role, address, metrics_port)
    await stop.wait()
    log.info("shutting down")


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
