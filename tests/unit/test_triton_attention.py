"""The Triton paged decode kernel against the PyTorch reference, under Triton's CPU interpreter.

TRITON_INTERPRET=1 has to be in the environment before triton is first imported, and other
tests in this pytest process may import triton without it, so the comparison runs in a fresh
interpreter. One subprocess runs every case (triton's import dominates the cost) and prints
one JSON line per case; the tests below assert on those lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each case: (name, dtype, num_heads, kv_heads, head_dim, block_size, context_lens,
# max_blocks, sliding_window, block_table_dtype, tolerance).
CASES: list[tuple] = [
    ("gqa1_bs8_fp32", "float32", 2, 2, 16, 8, [1, 13, 24], 5, None, "int64", 1e-5),
    ("gqa2_bs16_fp32", "float32", 4, 2, 16, 16, [1, 17, 40, 16], 4, None, "int32", 1e-5),
    ("gqa3_bs8_fp32", "float32", 6, 2, 16, 8, [5, 8, 31], 6, None, "int64", 1e-5),
    ("gqa4_d32_one_kv_head", "float32", 4, 1, 32, 8, [9, 2], 3, None, "int64", 1e-5),
    ("window_gqa2_bs8_fp32", "float32", 4, 2, 16, 8, [3, 6, 7, 29], 5, 6, "int32", 1e-5),
    ("gqa3_bs16_bf16", "bfloat16", 6, 2, 16, 16, [1, 20, 33], 4, None, "int64", 2e-2),
    ("gqa2_bs8_fp16_window", "float16", 4, 2, 16, 8, [12, 30], 5, 10, "int64", 5e-3),
]

# Runs in the child with TRITON_INTERPRET=1. Block tables come from a shuffled pool so
# block ids are non-contiguous; entries past a row's context are padding that points at
# other (random) blocks, which the kernel must never read.
CHILD = textwrap.dedent(
    """
    import json
    import sys

    import torch

    from engine.attention import paged_decode_attention
    from engine.triton_attention import paged_decode_attention_triton

    cases = json.loads(sys.argv[1])
    for seed, case in enumerate(cases):
        name, dtype, heads, kv_heads, dim, bs, lens, max_blocks, window, bt_dtype, _ = case
        try:
            gen = torch.Generator().manual_seed(seed)
            dt = getattr(torch, dtype)
            b = len(lens)
            num_blocks = b * max_blocks + 3
            q = torch.randn(b, heads, dim, generator=gen).to(dt)
            k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen).to(dt)
            v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen).to(dt)
            perm = torch.randperm(num_blocks, generator=gen)
            tables = perm[: b * max_blocks].view(b, max_blocks).clone()
            for i, n in enumerate(lens):
                used = -(-n // bs)
                assert used <= max_blocks, (name, n)
                # Padding: any valid id, here blocks owned by no row at all.
                tables[i, used:] = perm[b * max_blocks + (i % 3)]
            ctx = torch.tensor(lens, dtype=torch.int64)
            scale = dim**-0.5
            want = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
            got = paged_decode_attention_triton(
                q, k_cache, v_cache, tables.to(getattr(torch, bt_dtype)), ctx, scale, window
            )
            diff = (got.float() - want.float()).abs().max().item()
            rec = {"name": name, "diff": diff, "dtype": str(got.dtype).split(".")[-1],
                   "shape": list(got.shape), "finite": bool(torch.isfinite(got).all())}
        except Exception as e:  # report, so the other cases still run
            rec = {"name": name, "error": f"{type(e).__name__}: {e}"}
        print("CASE " + json.dumps(rec), flush=True)
    """
)


def _child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed"
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(CASES)],
        env=_child_env(TRITON_INTERPRET="1"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    recs = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    return {r["name"]: r for r in recs}


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(results: dict[str, dict], case: tuple) -> None:
    name, dtype, heads, _, dim, _, lens, _, _, _, tol = case
    rec = results.get(name)
    assert rec is not None, f"no result for {name}"
    assert "error" not in rec, rec["error"]
    assert rec["finite"]
    assert rec["dtype"] == dtype
    assert rec["shape"] == [len(lens), heads, dim]
    assert rec["diff"] < tol, f"{name}: max abs diff {rec['diff']} >= {tol}"


def test_import_does_not_import_triton() -> None:
    # Importing triton early would freeze interpreter-vs-GPU mode before callers choose.
    code = (
        "import sys, engine.triton_attention as m; "
        "assert 'triton' not in sys.modules, 'triton imported at module import'; "
        "print('ok', isinstance(m.triton_available(), bool))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok True"


def test_rejects_non_power_of_two_head_dim() -> None:
    # Shape checks run before triton is touched, so this needs no triton and no subprocess.
    from engine.triton_attention import paged_decode_attention_triton

    q = torch.zeros(1, 2, 24)
    cache = torch.zeros(4, 8, 2, 24)
    tables = torch.zeros(1, 2, dtype=torch.int64)
    lens = torch.tensor([3])
    with pytest.raises(AssertionError, match="head_dim must be a power of two"):
        paged_decode_attention_triton(q, cache, cache, tables, lens, 1.0)
