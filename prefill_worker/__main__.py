"""python -m prefill_worker: serve the PrefillWorker gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import grpc

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
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.server import PrefillServicer
from protos import splitserve_pb2_grpc as pb_grpc

log = logging.getLogger("splitserve.prefill")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prefill_worker",
        description="A prefill worker: computes prompts' KV cache and ships it to decode "
        "workers over gRPC.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve gRPC on")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: free, -1: off)")
    p.add_argument("--ready-file", help="write {address, pid, metrics_port} JSON here when ready")
    p.add_argument("-v", "--verbose", action="store_true")
    add_engine_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    metrics = PrefillMetrics()
    loop = asyncio.get_running_loop()

    def on_step(step: StepInfo) -> None:
        metrics.engine.observe_step(step)
        metrics.engine.observe_snapshot(aengine.snapshot)

    aengine = AsyncEngine(engine, loop, on_step=on_step)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    address = f"{args.host}:{port}"
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port)
    pb_grpc.add_PrefillWorkerServicer_to_server(
        PrefillServicer(aengine, metrics, address, metrics_port), server
    )
    aengine.start()
    await server.start()
    stop = asyncio.Event()
    install_stop_handlers(loop, stop.set)
    write_ready_file(
        args.ready_file,
        {"role": "prefill", "address": address, "pid": os.getpid(), "metrics_port": metrics_port},
    )
    log.info("prefill worker serving on %s (metrics on :%d)", address, metrics_port)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=1.0)
    aengine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging("prefill", args.verbose)
    try:
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"prefill_worker: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
