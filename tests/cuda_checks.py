"""What the CUDA tests (tests/gpu) share: the skip without a GPU, and float32 at full precision."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.device("cuda")

# Applied per module, so that on a machine without CUDA the whole lane still collects (CI runs
# every folder) and every test says why it did not run.
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full-precision float32 matmuls (and cuDNN) inside, restored after: the float32
    tolerances and the token-for-token equality assume no TF32 rounding."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])


def release_cuda_memory() -> None:
    """Give back what the last test's models and tensors held, so the big cases that follow
    find the memory free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
