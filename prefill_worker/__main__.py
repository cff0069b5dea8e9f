"""python -m prefill_worker: serve the PrefillWorker gRPC service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvtransfer.channels import SERVER_OPTIONS
from kvtransfer.security import (
    ClusterSecurity,
    add_port,
    add_security_args,
    make_server,
    warn_if_open,
)
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.server import DEFAULT_KV_LEASE_S, PrefillServicer
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
        prog="python -m prefill_worker",
        description="A prefill worker: computes prompts' KV cache and ships it to decode "
        "workers over gRPC.",
    )
    p.add_argument(
        "--kv-lease",
        type=float,
        default=DEFAULT_KV_LEASE_S,
        help="seconds a finished prompt's KV blocks stay held for the decode worker, from "
        "the first token to its acknowledgement; then they are freed and counted in "
        "splitserve_kv_lease_expired_total",
    )
    add_worker_args(p)
    add_security_args(p)
    return p


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM (drain, then 0) or the engine's death (EXIT_ENGINE_DIED)."""
    metrics = PrefillMetrics()
    life = WorkerLife(pb.DESCRIPTOR.services_by_name["PrefillWorker"].full_name)
    security = ClusterSecurity.from_args(args)
    aengine = load_engine(args, metrics.engine, on_fatal=life.engine_died)
    server = make_server(security, SERVER_OPTIONS)
    await life.attach(server)
    address = advertised_address(args, add_port(server, f"{args.host}:{args.port}", security))
    warn_if_open(security, "the prefill worker's gRPC port", address)
    metrics_port = start_metrics_server(metrics.registry, args.metrics_port, host=args.host)
    servicer = PrefillServicer(aengine, metrics, address, metrics_port, args.kv_lease)
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    aengine.start()
    await server.start()
    await life.announce_and_wait(args, "prefill", address, metrics_port)
    servicer.draining = True
    await drain(lambda: servicer.num_calls, life.drain_timeout(args.drain_timeout))
    await server.stop(grace=1.0)
    aengine.stop()
    return life.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker_main("prefill_worker", "prefill", parser().parse_args(argv), serve)


if __name__ == "__main__":
    sys.exit(main())
