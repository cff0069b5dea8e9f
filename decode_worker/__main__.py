"""python -m decode_worker: serve the DecodeWorker gRPC service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from decode_worker.metrics import DecodeMetrics
from decode_worker.remote_prefill import GrpcPrefill
from decode_worker.server import DecodeOptions, DecodeServicer, add_decode_args
from kvtransfer.channels import SERVER_OPTIONS
from kvtransfer.peers import add_known_prefill_args, known_prefill_from_args
from kvtransfer.security import (
    ClusterSecurity,
    add_port,
    add_security_args,
    make_server,
    warn_if_open,
)
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.process import (
    WorkerLife,
    add_worker_args,
    advertised_address,
    drain,
    load_engine,
    run_worker_main,
    start_metrics_server,
)


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
    add_decode_args(p)
    add_known_prefill_args(p)
    add_worker_args(p)
    add_security_args(p)
    return p


def _role(args: argparse.Namespace) -> str:
    return "colocated" if args.colocated else "decode"


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM (drain, then 0) or the engine's death (EXIT_ENGINE_DIED)."""
    metrics = DecodeMetrics(_role(args))
    life = WorkerLife(pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name)
    security = ClusterSecurity.from_args(args)
    known_prefill = known_prefill_from_args(args)
    aengine = load_engine(args, metrics.engine, on_fatal=life.engine_died)
    server = make_server(security, SERVER_OPTIONS)
    await life.attach(server)
    address = advertised_address(args, add_port(server, f"{args.host}:{args.port}", security))
    warn_if_open(security, f"the {_role(args)} worker's gRPC port", address)
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port, host=args.host)
    servicer = DecodeServicer(
        aengine,
        metrics,
        address,
        metrics_port,
        args.colocated,
        DecodeOptions.from_args(args),
        prefill_transport=GrpcPrefill(
            security, known_prefill, on_unknown=lambda _: metrics.prefill_unknown.inc()
        ),
    )
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    aengine.start()
    await server.start()
    await life.announce_and_wait(args, _role(args), address, metrics_port)
    servicer.draining = True
    await drain(lambda: servicer.num_streams, life.drain_timeout(args.drain_timeout))
    await server.stop(grace=1.0)
    await servicer.prefill.close()
    aengine.stop()
    return life.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_worker_main("decode_worker", _role(args), args, serve)


if __name__ == "__main__":
    sys.exit(main())
