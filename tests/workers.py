"""Workers a test starts by itself, small, whose gRPC Status it reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.cluster import WorkerProcess

ENGINE = ["--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1"]


class Worker(WorkerProcess):
    """A worker of a small engine (ENGINE), whose Status the tests read."""

    def __init__(self, module: str, model: Path, tmp: Path, *extra: str) -> None:
        super().__init__(module, model, tmp, *ENGINE, *extra)

    def status(self, stub_class: type = pb_grpc.PrefillWorkerStub) -> pb.WorkerStatus:
        async def ask() -> pb.WorkerStatus:
            async with grpc.aio.insecure_channel(self.address) as ch:
                return await stub_class(ch).Status(pb.StatusRequest(), timeout=10)

        return asyncio.run(ask())


def wait_until_idle(
    w: Worker, stub_class: type = pb_grpc.PrefillWorkerStub, timeout_s: float = 60
) -> pb.WorkerStatus:
    """The worker's Status once nothing is held, reserved or running (or the
    last one after timeout_s: asserting is the caller's)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = w.status(stub_class)
        idle = (
            s.held == 0
            and s.awaiting_kv == 0
            and s.running == 0
            and s.kv_blocks_free == s.kv_blocks_total
        )
        if idle or time.monotonic() > deadline:
            return s
        time.sleep(0.2)
