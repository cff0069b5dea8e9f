"""Paged decode attention on CPU through a small C kernel (engine/csrc).

The PyTorch path gathers every sequence's blocks into a padded copy before
attending; at batch 64 that copy, not the arithmetic, is most of the step.
The C kernel reads K and V in place through the block table, so each byte
of context is read once. It is compiled on first use with the system C
compiler (about a second), cached by source and machine, and loaded with
ctypes: no torch headers, no build step at install. Where no compiler is
found, `available()` is False and the engine keeps the PyTorch path.

The sequences are split across torch's intra-op thread count with OpenMP.
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

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.c"
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
_ARGTYPES = (
    [ctypes.c_void_p] * 6
    + [ctypes.c_int64] * 6
    + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
)


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
        log.warning("no C compiler found: decode attention uses the PyTorch path")
        return None
    key = hashlib.sha256(
        _SOURCE.read_bytes()
        + " ".join(_FLAGS).encode()
        + _cpu_signature().encode()
        + platform.machine().encode()
    ).hexdigest()[:16]
    lib_path = _cache_dir() / f"paged_decode_cpu-{key}.so"
    try:
        if not lib_path.exists() and not _compile(compiler, lib_path):
            return None
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:  # an unwritable cache, a library that will not load
        log.warning("CPU attention kernel unavailable (%s): using the PyTorch path", e)
        return None
    for name in ("paged_decode_f32", "paged_decode_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = _ARGTYPES
        fn.restype = None
    return lib


def _compile(compiler: str, lib_path: Path) -> bool:
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: concurrent processes never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        log.warning(
            "compiling the CPU attention kernel failed (%s): using the PyTorch path\n%s",
            " ".join(cmd),
            proc.stderr[-2000:],
        )
        return False
    os.replace(tmp, lib_path)
    log.info("compiled the CPU attention kernel into %s", lib_path)
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
