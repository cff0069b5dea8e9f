"""python -m decode_worker: serve the DecodeWorker gRPC service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from decode_worker.metrics import DecodeMetrics
from decode_worker.server import DecodeServicer
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
from protos import splitserve_pb2_grpc as pb_grpc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decode_worker",
        description="A decode worker: reserves KV blocks, receives prompts' KV from prefill "
        "workers and streams tokens from a continuously batched engine; with --colocated it "
        "prefills itself.",
    )
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
    add_worker_args(p)
    return p


def _role(args: argparse.Namespace) -> str:
    return "colocated" if args.colocated else "decode"


async def serve(args: argparse.Namespace) -> None:
    metrics = DecodeMetrics(_role(args))
    aengine = load_engine(args, metrics.engine)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    address = advertised_address(args, server.add_insecure_port(f"{args.host}:{args.port}"))
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port, host=args.host)
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
    await announce_and_wait(args, _role(args), address, metrics_port)
    servicer.draining = True
    await drain(lambda: servicer.num_streams, args.drain_timeout)
    await server.stop(grace=1.0)
    await servicer.prefill.close()
    aengine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_worker_main("decode_worker", _role(args), args, serve)


if __name__ == "__main__":
    sys.exit(main())
