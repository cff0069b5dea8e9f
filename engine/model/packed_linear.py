"""Linear layers with their weights pre-packed for oneDNN (CPU: float32, and
bfloat16 where the CPU computes it natively).

`nn.Linear` on CPU goes through MKL's plain GEMM, which repacks the weight
on every call and, on AMD CPUs, runs a generic code path. oneDNN packs the
weight once into the blocked layout its kernels read. On the 2-core AMD
EPYC (AVX2) we develop on, the decode step's GEMMs took 55 ms at batch 16
through MKL and 26 ms packed (bench/gemm.py measures it on your CPU). The
lm_head is the largest: 16 x 512 @ 512 x 32000 went from 30 ms to 11 ms.

In bfloat16, nn.Linear already runs oneDNN's kernels, but reorders the
weight into their blocked layout on every call; packed once, a Sapphire
Rapids (AMX) ran the decode step's GEMMs at batch 16 in 2.3 ms against
3.9 ms (batch 64: 3.8 against 7.4), with results bitwise equal to
nn.Linear's.

float32 results differ from MKL's only in summation order (max abs error
~1e-4 on logits of magnitude ~20). The weights stop being ordinary tensors:
pack after loading, and never read the packed weight back.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packed oneDNN linears run here: a CPU with oneDNN built in, in
    float32, or in bfloat16 where the CPU has bfloat16 instructions (oneDNN
    packs bfloat16 only for AVX512-BF16/AMX kernels)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W packed once for oneDNN; x is [N, in_features]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # No batch-size hint: one packing serves every batch size (the hinted
        # packings measured no faster across the batch sizes a step sees).
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        )
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; how many were replaced."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
