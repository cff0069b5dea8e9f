"""python -m prefill_worker: serve the PrefillWorker gRPC service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from engine.worker_process import (
    add_worker_args,
    advertised_address,
    announce_and_wait,
    drain,
    load_engine,
    run_worker_main,
    start_metrics_server,
)
from kvtransfer.grpc_backend import CHANNEL_OPTIONS
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.server import PrefillServicer
from protos import splitserve_pb2_grpc as pb_grpc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prefill_worker",
        description="A prefill worker: computes prompts' KV cache and ships it to decode "
        "workers over gRPC.",
    )
    add_worker_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    metrics = PrefillMetrics()
    aengine = load_engine(args, metrics.engine)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    address = advertised_address(args, server.add_insecure_port(f"{args.host}:{args.port}"))
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port, host=args.host)
    servicer = PrefillServicer(aengine, metrics, address, metrics_port)
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    aengine.start()
    await server.start()
    await announce_and_wait(args, "prefill", address, metrics_port)
    servicer.draining = True
    await drain(lambda: servicer.num_calls, args.drain_timeout)
    await server.stop(grace=1.0)
    aengine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker_main("prefill_worker", "prefill", parser().parse_args(argv), serve)


if __name__ == "__main__":
    sys.exit(main())
