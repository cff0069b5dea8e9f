"""oneDNN-packed linear layers against nn.Linear (engine/model/packed_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import LLM
from engine.model.packed_linear import PackedLinear, onednn_available, pack_linears

pytestmark = pytest.mark.skipif(
    not onednn_available(torch.float32, torch.device("cpu")), reason="this torch has no oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_packed_linear_equals_nn_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 320, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        want = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


BF16_PACKED = onednn_available(torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(not BF16_PACKED, reason="this CPU has no bfloat16 instructions for oneDNN")
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_packed_bfloat16_linear_equals_nn_linear(rows):
    """Where nn.Linear already runs oneDNN's bfloat16 kernels, packing the
    weight once changes no bit of the result."""
    torch.manual_seed(rows)
    linear = nn.Linear(512, 1408, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = linear(x)
        got = PackedLinear(linear)(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_the_engine_packs_bfloat16_linears_exactly_where_the_cpu_computes_bfloat16(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="bfloat16", device="cpu", kv_cache_bytes=2**20)
    assert llm.engine.runner.linear_backend == ("onednn" if BF16_PACKED else "torch")


def test_pack_linears_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = model(x)
        assert pack_linears(model) == 2
        got = model(x)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_onednn_refused_where_it_cannot_run(tiny_llama):
    with pytest.raises(ValueError, match="linear_backend='onednn' needs"):
        LLM(str(tiny_llama), dtype="float16", device="cpu", linear_backend="onednn")
    with pytest.raises(ValueError, match="linear_backend must be"):
        LLM(str(tiny_llama), linear_backend="mkl")
