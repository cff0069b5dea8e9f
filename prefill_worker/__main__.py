"""python -m prefill_worker: serve the PrefillWorker gRPC service."""

from __future__ import annotations

# The OpenMP wait policy must be in the environment before torch loads libgomp,
# so it is set before any other import (worker/omp_wait.py says why).
# ruff: noqa: E402
from worker.omp_wait import set_omp_wait

set_omp_wait("prefill")


import argparse
import sys
from collections.abc import Sequence

from kvtransfer.security import add_security_args
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.server import DEFAULT_KV_LEASE_S, PrefillServicer
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.process import RoleSpec, add_worker_args, run_worker_main, serve_role


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


def role(args: argparse.Namespace) -> RoleSpec:
    metrics = PrefillMetrics()
    return RoleSpec(
        name="prefill",
        service=pb.DESCRIPTOR.services_by_name["PrefillWorker"].full_name,
        metrics=metrics,
        make_servicer=lambda aengine, address, metrics_port, _security: PrefillServicer(
            aengine, metrics, address, metrics_port, args.kv_lease
        ),
        add_to_server=pb_grpc.add_PrefillWorkerServicer_to_server,
        in_flight=lambda servicer: servicer.num_calls,
    )


async def serve(args: argparse.Namespace) -> int:
    return await serve_role(args, role(args))


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker_main("prefill_worker", "prefill", parser().parse_args(argv), serve)


if __name__ == "__main__":
    sys.exit(main())
