"""CPU kernels in C (engine/csrc): paged decode attention, and the argmax of
greedy sampling.

The PyTorch attention path gathers every sequence's blocks into a padded copy before
attending; at batch 64 that copy, not the arithmetic, is most of the step.
The C kernel reads K and V in place through the block table, so each byte
of context is read once. It is compiled on first use with the system C
compiler (about a second), cached by source and machine, and loaded with
ctypes: no torch headers, no build step at install. Where no compiler is
found, `available()` is False and the engine keeps the PyTorch path.

Work is split across torch's intra-op thread count with OpenMP.
Torch ships its own libgomp under the same soname, and it is loaded before
this library, so the kernel runs on torch's thread pool rather than a second
one that would fight it for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("splitserve")

_SOURCES = [
    Path(__file__).parent / "csrc" / name for name in ("paged_decode_cpu.c", "argmax_cpu.c")
]
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fopenmp",
    "-shared",
    "-fPIC",
]
# q, k_cache, v_cache, block_tables, context_lens, out, then num_seqs, H, KV, D,
# BS, MB, then scale, window, scratch, max_ctx, threads
_ATTENTION_ARGTYPES = (
    [ctypes.c_void_p] * 6
    + [ctypes.c_int64] * 6
    + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
)
# x, rows, cols, out, threads
_ARGMAX_ARGTYPES = [
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_int64,
]


def _cache_dir() -> Path:
    root = os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve"
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    # -march=native code is only valid on a CPU with the same features.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU kernels fall back to PyTorch")
        return None
    key = hashlib.sha256(
        b"".join(src.read_bytes() for src in _SOURCES)
        + " ".join(_FLAGS).encode()
        + _cpu_signature().encode()
        + platform.machine().encode()
    ).hexdigest()[:16]
    lib_path = _cache_dir() / f"splitserve_cpu-{key}.so"
    try:
        if not lib_path.exists() and not _compile(compiler, lib_path):
            return None
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:  # an unwritable cache, a library that will not load
        log.warning("CPU kernels unavailable (%s): using the PyTorch paths", e)
        return None
    for name in ("paged_decode_f32", "paged_decode_bf16"):
        getattr(lib, name).argtypes = _ATTENTION_ARGTYPES
        getattr(lib, name).restype = None
    for name in ("argmax_rows_f32", "argmax_rows_bf16"):
        getattr(lib, name).argtypes = _ARGMAX_ARGTYPES
        getattr(lib, name).restype = None
    return lib


def _compile(compiler: str, lib_path: Path) -> bool:
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: concurrent processes never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        log.warning(
            "compiling the CPU kernels failed (%s): using the PyTorch paths\n%s",
            " ".join(cmd),
            proc.stderr[-2000:],
        )
        return False
    os.replace(tmp, lib_path)
    log.info("compiled the CPU kernels into %s", lib_path)
    return True


def available() -> bool:
    return _library() is not None


_scratch = torch.empty(0)


def _scratch_for(numel: int) -> torch.Tensor:
    # Grown, never shrunk, and reused: fresh memory is slow to touch here.
    global _scratch
    if _scratch.numel() < numel:
        _scratch = torch.empty(max(numel, 1 << 16), dtype=torch.float32)
    return _scratch


def paged_decode_attention_cpu(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same contract as engine.attention.paged_decode_attention (float32 or bfloat16)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available (no C compiler)")
    if q.dtype not in (torch.float32, torch.bfloat16) or k_cache.dtype != q.dtype:
        raise TypeError(f"CPU kernel takes float32 or bfloat16, got {q.dtype}/{k_cache.dtype}")
    fn = lib.paged_decode_f32 if q.dtype == torch.float32 else lib.paged_decode_bf16
    q = q.contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    b, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    max_ctx = int(context_lens.max()) if b else 0
    if sliding_window is not None:
        max_ctx = min(max_ctx, sliding_window)
    threads = max(1, min(torch.get_num_threads(), b))
    scratch = _scratch_for(threads * num_heads * max_ctx)
    fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        b,
        num_heads,
        kv_heads,
        head_dim,
        block_size,
        block_tables.shape[1],
        scale,
        sliding_window or 0,
        scratch.data_ptr(),
        max_ctx,
        threads,
    )
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum, like `x.argmax(-1)`, for a 2-D
    contiguous CPU float32/bfloat16 tensor; falls back to torch otherwise."""
    lib = _library()
    if lib is None or x.device.type != "cpu" or x.dim() != 2 or not x.is_contiguous():
        return x.argmax(dim=-1)
    if x.dtype == torch.bfloat16:
        fn = lib.argmax_rows_bf16
    elif x.dtype == torch.float32:
        fn = lib.argmax_rows_f32
    else:
        return x.argmax(dim=-1)
    rows, cols = x.shape
    out = torch.empty(rows, dtype=torch.int64)
    if rows:
        fn(x.data_ptr(), rows, cols, out.data_ptr(), max(1, min(torch.get_num_threads(), rows)))
    return out
