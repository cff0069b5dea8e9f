"""A worker whose Status answers late is busy, not dead: the router keeps
it healthy for slow_grace_s after its last answer (a burst that saturates a
worker's event loop must not turn into 503s), then marks it unhealthy; a
refused connection is marked at once."""

from __future__ import annotations

import asyncio

import grpc

from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from router.pool import WorkerPool


class SlowStatus(pb_grpc.DecodeWorkerServicer):
    """Answers Status at once until told to take `delay_s` (a worker whose
    event loop a burst keeps busy)."""

    def __init__(self) -> None:
        self.delay_s = 0.0

    async def Status(self, request: pb.StatusRequest, context: object) -> pb.WorkerStatus:
        await asyncio.sleep(self.delay_s)
        return pb.WorkerStatus(role="colocated", block_size=16, kv_blocks_total=10)


def test_a_late_status_is_tolerated_for_the_grace_then_marks_the_worker():
    async def scenario() -> list[bool]:
        servicer = SlowStatus()
        server = grpc.aio.server()
        pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        # Polled by hand here: the background poll waits an hour.
        pool = WorkerPool(
            [f"127.0.0.1:{port}"], [], poll_interval_s=3600, poll_timeout_s=0.2, slow_grace_s=1.0
        )
        await pool.start()
        seen = []
        try:
            await pool.poll_all()
            seen.append(pool.decode[0].healthy)  # answered: healthy
            servicer.delay_s = 0.5  # past the poll's timeout from now on
            await pool.poll_all()
            seen.append(pool.decode[0].healthy)  # late once, within the grace
            await asyncio.sleep(1.0)
            await pool.poll_all()
            seen.append(pool.decode[0].healthy)  # silent past the grace
            servicer.delay_s = 0.0
            await pool.poll_all()
            seen.append(pool.decode[0].healthy)  # answers again
            await server.stop(grace=None)
            await pool.poll_all()
            seen.append(pool.decode[0].healthy)  # gone: marked at once
        finally:
            await pool.close()
            await server.stop(grace=None)
        return seen

    assert asyncio.run(scenario()) == [True, True, False, True, False]
