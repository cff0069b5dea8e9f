"""What every worker process does around its engine: log setup, the
Prometheus endpoint, the ready file a launcher waits on, and shutting down
cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


def setup_logging(name: str, verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {name}[{os.getpid()}]: %(message)s",
        datefmt="%H:%M:%S",
    )


def start_metrics_server(registry: CollectorRegistry, port: int) -> int:
    """Serve /metrics on 127.0.0.1:port (0 picks a free port); the port, or
    0 when disabled (port < 0)."""
    if port < 0:
        return 0
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return int(server.server_port)


def write_ready_file(path: str | None, info: dict[str, Any]) -> None:
    """Atomically write the JSON a launcher polls for (address, pid, ...)."""
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def install_stop_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
