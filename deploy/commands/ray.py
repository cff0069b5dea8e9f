"""`splitserve up` and `splitserve down`: the cluster on Ray."""

from __future__ import annotations

import argparse
from typing import Any

from deploy.commands.common import DEFAULT_STATE_FILE


def add_up_parser(sub: Any) -> None:
    upp = sub.add_parser(
        "up",
        help="run the cluster on Ray (an embedded local Ray, or one you name)",
        description="Deploy splitserve as a Ray Serve application from a scaling config: the "
        "router as the HTTP ingress, each pool as its own deployment placed by its resources "
        "and autoscaled on its own signal (prefill on queued prompt tokens, decode on KV-cache "
        "usage or waiting requests), KV between pools through the Ray object store "
        "(kv_transport: ray) or gRPC. Without --address it starts a local Ray on 127.0.0.1 and "
        "stops it on exit. Runs in the foreground and prints every scaling step; Ctrl-C or "
        "`splitserve down` stops it (replicas drain their requests first).",
    )
    upp.add_argument("--config", required=True, help="the scaling config (YAML)")
    upp.add_argument(
        "--address",
        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one",
    )
    upp.add_argument(
        "--num-cpus", type=int, help="CPUs of the embedded local Ray (default: this machine's)"
    )
    upp.add_argument(
        "--state-file",
        default=str(DEFAULT_STATE_FILE),
        help="where `up` records its PID for `down` (default: %(default)s)",
    )
    upp.set_defaults(run=_up)


def add_down_parser(sub: Any) -> None:
    dn = sub.add_parser(
        "down",
        help="stop what `splitserve up` started",
        description="Stop the running `splitserve up` (its replicas drain first); with "
        "--address and no running `up`, delete the application from that Ray cluster.",
    )
    dn.add_argument("--address", help="the Ray cluster to delete the application from")
    dn.add_argument("--state-file", default=str(DEFAULT_STATE_FILE), help="(default: %(default)s)")
    dn.set_defaults(run=_down)


def _up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.config import load_config

    config = load_config(args.config)  # every error before anything starts
    from deploy.ray_cluster import up

    return up(config, args.address, args.num_cpus, Path(args.state_file).expanduser())


def _down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.ray_cluster import down

    return down(Path(args.state_file), args.address)


def add_parser(sub: Any) -> None:
    add_up_parser(sub)
    add_down_parser(sub)
