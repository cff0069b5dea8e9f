"""python -m decode_worker: serve the DecodeWorker gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import grpc

from decode_worker.metrics import DecodeMetrics
from decode_worker.server import DecodeServicer
from engine.args import add_engine_args, engine_config_from_args
from engine.async_engine import AsyncEngine, StepInfo
from engine.llm_engine import LLMEngine
from engine.worker_process import (
    install_stop_handlers,
    setup_logging,
    start_metrics_server,
    write_ready_file,
)
from kvtransfer.grpc_backend import CHANNEL_OPTIONS
from protos import splitserve_pb2_grpc as pb_grpc

log = logging.getLogger("splitserve.decode")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decode_worker",
        description="A decode worker: reserves KV blocks, receives prompts' KV from prefill "
        "workers and streams tokens from a continuously batched engine; with --colocated it "
        "prefills itself.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve gRPC on")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: free, -1: off)")
    p.add_argument("--ready-file", help="write {address, pid, metrics_port} JSON here when ready")
    p.add_argument(
        "--colocated", action="store_true", help="prefill and decode here (no prefill pool)"
    )
    p.add_argument(
        "--kv-reservation-ttl",
        type=float,
        default=120.0,
        help="seconds a KV reservation waits for its prefill before it expires and the "
        "prompt is prefilled here instead",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="send tokens to the router every N tokens (the first at once); >1 trades "
        "streaming granularity for throughput",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_engine_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    role = "colocated" if args.colocated else "decode"
    metrics = DecodeMetrics(role)
    loop = asyncio.get_running_loop()

    def on_step(step: StepInfo) -> None:
        metrics.engine.observe_step(step)
        metrics.engine.observe_snapshot(aengine.snapshot)

    aengine = AsyncEngine(engine, loop, on_step=on_step)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    address = f"{args.host}:{port}"
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port)
    servicer = DecodeServicer(
        aengine,
        metrics,
        address,
        metrics_port,
        args.colocated,
        args.kv_reservation_ttl,
        max(1, args.stream_interval),
    )
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    aengine.start()
    await server.start()
    stop = asyncio.Event()
    install_stop_handlers(loop, stop.set)
    write_ready_file(
        args.ready_file,
        {"role": role, "address": address, "pid": os.getpid(), "metrics_port": metrics_port},
    )
    log.info("%s worker serving on %s (metrics on :%d)", role, address, metrics_port)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=1.0)
    await servicer.prefill_clients.close()
    aengine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging((args.colocated and "colocated") or "decode", args.verbose)
    try:
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"decode_worker: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
