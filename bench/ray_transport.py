"""The two KV transports side by side on one Ray cluster: the object store
(`kv_transport: ray`) against gRPC (`kv_transport: grpc`).

Both applications run at once on the same embedded local Ray (1 prefill + 1
decode replica each, the built-in model), behind the same Serve HTTP proxy
at /ray and /grpc. Requests alternate between them, one at a time, for
prompts of 512 and 2048 tokens; each trial records

  - time to first token at the client (streaming, through the proxy and the
    router: what a user sees);
  - the KV transfer as the decode worker measured it: bytes, and seconds
    from the first token to the KV written into its cache (the first token
    never waits for it), hence bytes per second.

    python bench/ray_transport.py [--trials 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from typing import Any

import httpx

from deploy.config import ClusterConfig

SIZES = (512, 2048)


def _config(transport: str, model: str | None) -> ClusterConfig:
    pool = {
        "replicas": 1,
        "resources": {"num_cpus": 0.5},
        "engine": {"kv_cache_mib": 256, "max_num_batched_tokens": 2048},
    }
    return ClusterConfig.model_validate(
        {"model": model, "kv_transport": transport, "pools": {"prefill": pool, "decode": pool}}
    )


def _trial(client: httpx.Client, url: str, prompt: list[int]) -> dict[str, float]:
    body = {
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    timings: dict[str, Any] = {}
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read().decode(errors='replace')}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            timings = event.get("splitserve_timings") or timings
    if ttft is None or not timings.get("kv_transfer_bytes"):
        raise RuntimeError(f"no first token or no KV timings from {url}: {timings}")
    return {
        "ttft_s": ttft,
        "kv_bytes": float(timings["kv_transfer_bytes"]),
        "kv_s": float(timings["kv_transfer_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=9, help="trials per transport and size")
    p.add_argument(
        "--model", help="model directory (default: the built-in model's shape, 4k context)"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from ray import serve

    from deploy.ray_app import build_app
    from deploy.ray_cluster import start_ray

    model = args.model
    if model is None:  # the built-in model's architecture, with room for 2048-token prompts
        import tempfile

        from modelmaker import make_model

        model = str(
            make_model(
                tempfile.mkdtemp(prefix="ray_transport_"),
                preset="small",
                max_position_embeddings=4096,
            )
        )
    start_ray(None, 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    try:
        for transport in ("ray", "grpc"):
            print(f"deploying the {transport} application...", flush=True)
            serve.run(
                build_app(_config(transport, model)),
                name=f"kv-{transport}",
                route_prefix=f"/{transport}",
            )
            urls[transport] = f"http://127.0.0.1:{port}/{transport}"
        results: dict[str, dict[int, list[dict[str, float]]]] = {t: {} for t in urls}
        with httpx.Client() as client:
            for url in urls.values():  # warm both paths up
                for n in SIZES:
                    _trial(client, url, [100 + i % 1000 for i in range(n)])
            for n in SIZES:
                for i in range(args.trials):
                    prompt = [100 + (i * 7 + j) % 1000 for j in range(n)]
                    order = list(urls) if i % 2 == 0 else list(reversed(urls))
                    for transport in order:
                        trial = _trial(client, urls[transport], prompt)
                        results[transport].setdefault(n, []).append(trial)
                    print(f"  {n} tokens: trial {i + 1}/{args.trials}", end="\r", flush=True)
                print()
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()

    print("\nKV transport on one Ray cluster (medians; 1 prefill + 1 decode replica each)")
    print(f"{'prompt':>7} {'transport':>10} {'TTFT ms':>9} {'KV MiB':>7} {'KV ms':>7} {'GB/s':>6}")
    summary: dict[str, Any] = {}
    for n in SIZES:
        for transport, by_size in results.items():
            rows = by_size[n]
            ttft = statistics.median(r["ttft_s"] for r in rows) * 1e3
            kv_s = statistics.median(r["kv_s"] for r in rows)
            kv_bytes = statistics.median(r["kv_bytes"] for r in rows)
            rate = kv_bytes / kv_s / 1e9 if kv_s > 0 else float("nan")
            summary[f"{transport}_{n}"] = {
                "ttft_ms": ttft,
                "kv_ms": kv_s * 1e3,
                "kv_bytes": kv_bytes,
                "gb_per_s": rate,
                "ttft_p90_ms": sorted(r["ttft_s"] for r in rows)[int(0.9 * (len(rows) - 1))] * 1e3,
            }
            print(
                f"{n:>7} {transport:>10} {ttft:>9.1f} {kv_bytes / 2**20:>7.1f} "
                f"{kv_s * 1e3:>7.1f} {rate:>6.2f}"
            )
        ray_, grpc_ = summary[f"ray_{n}"], summary[f"grpc_{n}"]
        print(
            f"{n:>7} {'ray/grpc':>10} {ray_['ttft_ms'] / grpc_['ttft_ms']:>9.2f}x "
            f"{'':>7} {ray_['kv_ms'] / grpc_['kv_ms']:>7.2f}x "
            f"{ray_['gb_per_s'] / grpc_['gb_per_s']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
