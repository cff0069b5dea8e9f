"""KV transfer over loopback gRPC against the transport's own ceiling, and
what disaggregation adds to time to first token.

Part 1, throughput. The same KV bytes (one prompt's KV: every layer's K and V,
in chunks of at most 4 MiB, as the prefill worker sends them) move from a
child process to this one, three ways, side by side:
  (a) splitserve's path: PrefillWorker-style server stream over grpc.aio,
      chunks encoded by kvtransfer.grpc_backend, decoded zero-copy and
      written by a KvReceiver into a KV pool that was touched at start;
  (b) the ceiling: a raw TCP socket, the same bytes, recv_into a touched
      buffer (no framing, no protobuf);
  (c) for scale: a warm in-process memcpy of the same bytes.

Part 2, time to first token at idle, for prompts of 512 and 2048 tokens:
real worker processes (one prefill + one decode, and one colocated worker),
one request at a time, measured at the gRPC client (router excluded), with the
KV transfer time (which the first token does not wait for) shown apart.

    python bench/kv_transfer.py                  # both parts
    python bench/kv_transfer.py --skip-ttft      # throughput only
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvtransfer.base import DEFAULT_MAX_CHUNK_BYTES

# The default model's KV layout: 8 layers, 4 KV heads of 64, bfloat16.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16


def make_layers(num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n_blocks = num_tokens // BLOCK
    g = torch.Generator().manual_seed(0)
    shape = (n_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    return [
        (torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16())
        for _ in range(LAYERS)
    ]


# -- (a) gRPC ---------------------------------------------------------------------


def _grpc_server(port_q: mp.Queue, num_tokens: int, repeats: int, chunk_bytes: int) -> None:
    import grpc

    from kvtransfer.base import split_layer
    from kvtransfer.grpc_backend import CHANNEL_OPTIONS, chunk_to_proto
    from protos import splitserve_pb2 as pb
    from protos import splitserve_pb2_grpc as pb_grpc

    layers = make_layers(num_tokens)
    blocks = list(range(num_tokens // BLOCK))

    class Servicer(pb_grpc.PrefillWorkerServicer):
        async def Prefill(self, request_iterator, context):
            await context.read()
            for r in range(repeats):
                for layer, (k, v) in enumerate(layers):
                    # Encode per send, as the worker does (the copy is part of the cost).
                    for chunk in split_layer(f"r{r}", layer, blocks, k, v, chunk_bytes):
                        await context.write(pb.PrefillServerMessage(kv=chunk_to_proto(chunk)))
            await context.write(pb.PrefillServerMessage(done=pb.KvDone()))

    async def main() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        port = server.add_insecure_port("127.0.0.1:0")
        pb_grpc.add_PrefillWorkerServicer_to_server(Servicer(), server)
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def bench_grpc(num_tokens: int, repeats: int, chunk_bytes: int) -> tuple[float, int]:
    import grpc

    from kvtransfer.base import KvReceiver
    from kvtransfer.grpc_backend import CHANNEL_OPTIONS, chunk_from_proto
    from protos import splitserve_pb2 as pb
    from protos import splitserve_pb2_grpc as pb_grpc

    ctx = mp.get_context("spawn")
    port_q: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=_grpc_server, args=(port_q, num_tokens, repeats, chunk_bytes), daemon=True
    )
    proc.start()
    port = port_q.get(timeout=60)
    n_blocks = num_tokens // BLOCK
    pool = [
        (torch.zeros(n_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16),) * 2
        for _ in range(LAYERS)
    ]

    def write(layer, block_ids, k, v):
        idx = torch.tensor(block_ids)
        pool[layer][0].index_copy_(0, idx, k)
        pool[layer][1].index_copy_(0, idx, v)

    rx = KvReceiver(write, LAYERS, (BLOCK, KV_HEADS, HEAD_DIM), torch.bfloat16)
    # The bench server does not echo reservation generations: tag its chunks here.
    generations = {
        f"r{r}": rx.expect(f"r{r}", list(range(n_blocks)), ttl_s=600) for r in range(repeats)
    }

    async def run() -> tuple[float, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            call = pb_grpc.PrefillWorkerStub(ch).Prefill()
            await call.write(pb.PrefillClientMessage(request=pb.PrefillRequest()))
            nbytes = 0
            start = time.perf_counter()
            async for msg in call:
                if msg.WhichOneof("kind") == "kv":
                    chunk = chunk_from_proto(msg.kv)
                    chunk = dataclasses.replace(chunk, reservation=generations[chunk.request_id])
                    rx.accept(chunk)
                    nbytes += chunk.nbytes
            return time.perf_counter() - start, nbytes

    try:
        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.join()


# -- (b) raw TCP ------------------------------------------------------------------


def _tcp_sender(port: int, num_tokens: int, repeats: int) -> None:
    layers = make_layers(num_tokens)
    payload = [t.view(torch.uint8).numpy().tobytes() for kv in layers for t in kv]
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(repeats):
            for p in payload:
                s.sendall(p)


def bench_tcp(num_tokens: int, repeats: int) -> tuple[float, int]:
    total = LAYERS * 2 * num_tokens * KV_HEADS * HEAD_DIM * 2 * repeats
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        ctx = mp.get_context("spawn")
        proc = ctx.Process(
            target=_tcp_sender, args=(srv.getsockname()[1], num_tokens, repeats), daemon=True
        )
        proc.start()
        conn, _ = srv.accept()
        got = conn.recv_into(view)  # the first bytes start the clock, as with gRPC
        start = time.perf_counter()
        with conn:
            while got < total:
                n = conn.recv_into(view)
                if n == 0:
                    break
                got += n
        elapsed = time.perf_counter() - start
        proc.join()
    return elapsed, got


def bench_memcpy(num_tokens: int, repeats: int) -> tuple[float, int]:
    layers = make_layers(num_tokens)
    dst = [(torch.empty_like(k), torch.empty_like(v)) for k, v in layers]
    for (dk, dv), (k, v) in zip(dst, layers, strict=True):  # warm
        dk.copy_(k)
        dv.copy_(v)
    start = time.perf_counter()
    for _ in range(repeats):
        for (dk, dv), (k, v) in zip(dst, layers, strict=True):
            dk.copy_(k)
            dv.copy_(v)
    return time.perf_counter() - start, sum(k.nbytes + v.nbytes for k, v in layers) * repeats


# -- part 2: TTFT with real workers -------------------------------------------------


def start_worker(module: str, model: str, workdir: Path, name: str, extra: list[str]) -> tuple:
    ready = workdir / f"{name}.ready"
    cmd = [sys.executable, "-m", module, "--model", model, "--ready-file", str(ready)]
    cmd += ["--kv-cache-mib", "128", "--metrics-port", "-1", *extra]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    # Each role sets its own OpenMP wait policy, as under `splitserve serve`.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(1200):
        if ready.exists():
            return proc, json.loads(ready.read_text())["address"]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} died; see {workdir / name}.log")
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready")


def bench_ttft(prompt_lens: list[int], trials: int) -> list[dict]:
    import grpc

    from engine.sampling_params import SamplingParams
    from modelmaker import make_model
    from protos import splitserve_pb2 as pb
    from protos import splitserve_pb2_grpc as pb_grpc
    from worker.wire import params_to_pb

    workdir = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    model = str(make_model(workdir / "model", preset="small", max_position_embeddings=4096))
    procs = []
    try:
        p_proc, p_addr = start_worker("prefill_worker", model, workdir, "prefill", [])
        procs.append(p_proc)
        d_extra = ["--prefill-addresses", p_addr]  # the only prefill worker it may dial
        d_proc, d_addr = start_worker("decode_worker", model, workdir, "decode", d_extra)
        procs.append(d_proc)
        c_proc, c_addr = start_worker("decode_worker", model, workdir, "colo", ["--colocated"])
        procs.append(c_proc)
        params = params_to_pb(SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))

        async def one(stub, ids, prefill, rid):
            start = time.perf_counter()
            ttft = None
            timings = None
            req = pb.GenerateRequest(
                request_id=rid, prompt_token_ids=ids, sampling_params=params,
                prefill_addresses=prefill,
            )  # fmt: skip
            async for msg in stub.Generate(req):
                if ttft is None and msg.token_ids:
                    ttft = time.perf_counter() - start
                if msg.finish_reason:
                    timings = msg.timings
            return ttft, timings

        async def run() -> list[dict]:
            rows = []
            d_ch = grpc.aio.insecure_channel(d_addr)
            c_ch = grpc.aio.insecure_channel(c_addr)
            d_stub, c_stub = pb_grpc.DecodeWorkerStub(d_ch), pb_grpc.DecodeWorkerStub(c_ch)
            for n in prompt_lens:
                ids = [16 + (i * 7919) % 30000 for i in range(n)]
                dis, colo, xfer, hop_d, hop_c = [], [], [], [], []
                for t in range(trials + 1):  # the first round warms up
                    # Alternate which goes first, so drift on a noisy machine
                    # does not always favour one.
                    order = [("d", d_stub, [p_addr]), ("c", c_stub, [])]
                    results = {}
                    for name, stub, prefill in order if t % 2 else order[::-1]:
                        results[name] = await one(stub, ids, prefill, f"{name}{n}-{t}")
                    if not t:
                        continue
                    (ttft_d, tim_d), (ttft_c, tim_c) = results["d"], results["c"]
                    dis.append(ttft_d)
                    colo.append(ttft_c)
                    xfer.append(tim_d.kv_transfer_s)
                    nbytes = tim_d.kv_transfer_bytes
                    # What serving added on top of the prompt's own compute.
                    hop_d.append(ttft_d - tim_d.prefill_s)
                    hop_c.append(ttft_c - tim_c.prefill_s)
                md, mc = statistics.median(dis), statistics.median(colo)
                rows.append(
                    {
                        "prompt_tokens": n,
                        "ttft_disagg_ms": md * 1e3,
                        "ttft_colocated_ms": mc * 1e3,
                        "added_pct": (md / mc - 1) * 100,
                        "overhead_disagg_ms": statistics.median(hop_d) * 1e3,
                        "overhead_colocated_ms": statistics.median(hop_c) * 1e3,
                        "kv_transfer_ms": statistics.median(xfer) * 1e3,
                        "kv_bytes": nbytes,
                    }
                )
            await d_ch.close()
            await c_ch.close()
            return rows

        return asyncio.run(run())
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens per KV payload")
    ap.add_argument("--repeats", type=int, default=16, help="payloads per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (median)")
    ap.add_argument("--trials", type=int, default=9, help="TTFT requests per prompt length")
    ap.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_MAX_CHUNK_BYTES, help="KV chunk size cap"
    )
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    mib = LAYERS * 2 * args.tokens * KV_HEADS * HEAD_DIM * 2 / 2**20
    print(f"payload: the KV of a {args.tokens}-token prompt, {mib:.0f} MiB, x{args.repeats}")
    rates: dict[str, list[float]] = {"grpc": [], "tcp": [], "memcpy": []}
    for _ in range(args.rounds):
        for name, fn in (
            ("grpc", lambda n, r: bench_grpc(n, r, args.chunk_bytes)),
            ("tcp", bench_tcp),
            ("memcpy", bench_memcpy),
        ):
            secs, nbytes = fn(args.tokens, args.repeats)
            rates[name].append(nbytes / secs / 1e9)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{'path':<28}{'GB/s (median)':>14}   rounds")
    for name, label in (
        ("grpc", "gRPC + codec + receiver"),
        ("tcp", "raw TCP socket (ceiling)"),
        ("memcpy", "warm memcpy (scale)"),
    ):
        runs = " ".join(f"{r:.2f}" for r in rates[name])
        print(f"{label:<28}{med[name]:>14.2f}   {runs}")
    ratio = med["grpc"] / med["tcp"]
    print(f"gRPC / raw TCP = {ratio:.2f} (target >= 0.5)")
    results: dict = {"throughput_gbps": med, "grpc_over_tcp": ratio, "rounds": rates}

    if not args.skip_ttft:
        rows = bench_ttft([512, 2048], args.trials)
        head = ("prompt", "TTFT disagg", "colocated", "added", "overhead d/c", "KV xfer", "KV MiB")
        widths = (7, 13, 11, 8, 15, 9, 8)
        print("\n" + "".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
        for r in rows:
            print(
                f"{r['prompt_tokens']:>7}{r['ttft_disagg_ms']:>11.1f}ms{r['ttft_colocated_ms']:>9.1f}ms"
                f"{r['added_pct']:>7.1f}%"
                f"{r['overhead_disagg_ms']:>7.1f}/{r['overhead_colocated_ms']:.1f}ms"
                f"{r['kv_transfer_ms']:>7.1f}ms{r['kv_bytes'] / 2**20:>8.1f}"
            )
        results["ttft"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
