"""python -m decode_worker: serve the DecodeWorker gRPC service."""

from __future__ import annotations

# The OpenMP wait policy must be in the environment before torch loads libgomp,
# so it is set before any other import (worker/omp_wait.py says why).
# ruff: noqa: E402
from worker.omp_wait import set_omp_wait

set_omp_wait("decode")


import argparse
import sys
from collections.abc import Sequence

from decode_worker.metrics import DecodeMetrics
from decode_worker.options import DecodeOptions, add_decode_args
from decode_worker.server import DecodeServicer
from engine.async_engine import AsyncEngine
from kvtransfer.grpc_backend import GrpcPrefill
from kvtransfer.peers import add_known_prefill_args, known_prefill_from_args
from kvtransfer.security import ClusterSecurity, add_security_args
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.process import RoleSpec, add_worker_args, run_worker_main, serve_role


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


def role(args: argparse.Namespace) -> RoleSpec:
    metrics = DecodeMetrics(_role(args))
    known_prefill = known_prefill_from_args(args)

    def make_servicer(
        aengine: AsyncEngine, address: str, metrics_port: int, security: ClusterSecurity
    ) -> DecodeServicer:
        transport = GrpcPrefill(
            security, known_prefill, on_unknown=lambda _: metrics.prefill_unknown.inc()
        )
        return DecodeServicer(
            aengine,
            metrics,
            address,
            metrics_port,
            args.colocated,
            DecodeOptions.from_args(args),
            prefill_transport=transport,
        )

    async def close(servicer: DecodeServicer) -> None:
        await servicer.prefill.close()

    return RoleSpec(
        name=_role(args),
        service=pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name,
        metrics=metrics,
        make_servicer=make_servicer,
        add_to_server=pb_grpc.add_DecodeWorkerServicer_to_server,
        in_flight=lambda servicer: servicer.num_streams,
        close=close,
    )


async def serve(args: argparse.Namespace) -> int:
    return await serve_role(args, role(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_worker_main("decode_worker", _role(args), args, serve)


if __name__ == "__main__":
    sys.exit(main())
