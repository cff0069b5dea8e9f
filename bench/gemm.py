"""The GEMM libraries side by side, on the shapes a decode step runs.

For each linear layer of the model (fused qkv, o, fused gate/up, down, the
lm_head) at a few batch sizes, the time of y = x @ W.T through:

  mkl         nn.Linear / F.linear: torch's default CPU path (MKL here)
  mkl-packed  MKL with the weight packed once (what inductor's freezing uses)
  onednn      oneDNN with the weight packed once (engine/model/packed_linear.py)
  openblas    numpy's matmul (OpenBLAS, as numpy's wheels ship it)

and the achieved GFLOP/s, against two ceilings of this machine: a large
square fp32 GEMM (about the best the cores do) and the memory bandwidth
(a decode step must read every weight once). Rounds are interleaved and the
best of each is kept.

    python bench/gemm.py                    # the default model's shapes, batch 1/16/64
    python bench/gemm.py --batches 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def model_shapes(model_dir: str | None) -> dict[str, tuple[int, int, int]]:
    """layer name -> (in_features, out_features, how many per step)."""
    from engine.config import ModelConfig
    from modelmaker import ensure_default_model

    cfg = ModelConfig.from_pretrained(model_dir or str(ensure_default_model()))
    q, kv, hidden = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    n = cfg.num_layers
    return {
        "qkv": (hidden, q + 2 * kv, n),
        "o": (q, hidden, n),
        "gate_up": (hidden, 2 * cfg.intermediate_size, n),
        "down": (cfg.intermediate_size, hidden, n),
        "lm_head": (hidden, cfg.vocab_size, 1),
    }


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {"mkl": lambda: F.linear(x, w)}
    m = x.shape[0]
    if w.dtype == torch.float32 and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        out["mkl-packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, m)
    try:
        onednn = torch.ops.mkldnn._reorder_linear_weight(w)
        out["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")
    except RuntimeError:
        pass  # e.g. bfloat16 packing on a CPU without AVX512-BF16
    if w.dtype == torch.float32:
        wn, xn = w.numpy().T.copy(), x.numpy()
        out["openblas"] = lambda: xn @ wn
    return out


def ceilings(dtype: torch.dtype) -> dict[str, float]:
    a = torch.randn(2048, 2048, dtype=dtype)
    ms = best_ms(lambda: a @ a, 5)
    big = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    read_ms = best_ms(lambda: big.sum(), 5)
    return {
        "square_gemm_gflops": 2 * 2048**3 / ms / 1e6,
        "read_gbs": big.numel() * 4 / read_ms / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="model directory (default: the built-in model)")
    ap.add_argument("--batches", default="1,16,64", help="rows of x (decode batch sizes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="timed calls per round")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shapes = model_shapes(args.model)
    ceil = ceilings(dtype)
    print(
        f"torch threads {torch.get_num_threads()}, {args.dtype}: square 2048 GEMM "
        f"{ceil['square_gemm_gflops']:.0f} GFLOP/s, memory read {ceil['read_gbs']:.1f} GB/s"
    )
    results: dict = {"ceilings": ceil, "batches": {}}
    for m in (int(b) for b in args.batches.split(",")):
        step: dict[str, float] = {}
        weight_bytes = 0
        print(f"\nbatch {m}:")
        for name, (k, n, count) in shapes.items():
            w, x = torch.randn(n, k, dtype=dtype), torch.randn(m, k, dtype=dtype)
            weight_bytes += w.numel() * w.element_size() * count
            fns = candidates(w, x)
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(args.rounds):  # interleaved: drift hits every library alike
                for lib, fn in fns.items():
                    best[lib] = min(best[lib], best_ms(fn, args.reps))
            flops = 2 * m * k * n
            cells = ", ".join(
                f"{lib} {ms:.2f} ms ({flops / ms / 1e6:.0f} GF/s)" for lib, ms in best.items()
            )
            print(f"  {name:8s} {m}x{k} @ {k}x{n} (x{count}): {cells}")
            for lib, ms in best.items():
                step[lib] = step.get(lib, 0.0) + ms * count
            results["batches"].setdefault(str(m), {})[name] = best
        floor_ms = weight_bytes / ceil["read_gbs"] / 1e6
        per_lib = ", ".join(f"{lib} {ms:.1f} ms" for lib, ms in step.items())
        print(f"  all GEMMs of one step: {per_lib}; reading the weights once: {floor_ms:.1f} ms")
        results["batches"][str(m)]["step_ms"] = step
        results["batches"][str(m)]["weight_read_ms"] = floor_ms
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
