"""`--dtype auto`: bfloat16 only where the hardware runs it natively
(engine/dtype_choice.py). CPU flags and GPU bfloat16 support are injected,
so every rule is checked on any machine; the last tests check this machine's
own choice against its /proc/cpuinfo."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.dtype_choice import DTYPES, choose_dtype, host_cpu_flags

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
NO_NATIVE_BF16 = "CPU has no native bfloat16 (no amx_bf16/avx512_bf16): float32 is faster"
NATIVE_BF16 = "CPU has AMX/AVX512-BF16: bfloat16 runs natively"


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_auto_on_a_cpu_with_native_bf16_is_bfloat16(flag):
    choice = choose_dtype("auto", CPU, "float32", cpu_flags=AVX2_ONLY | {"avx512f", flag})
    assert (choice.dtype, choice.name, choice.reason) == (torch.bfloat16, "bfloat16", NATIVE_BF16)
    assert choice.describe() == f"bfloat16 (auto: {NATIVE_BF16})"


def test_auto_on_an_avx2_cpu_is_float32_whatever_the_checkpoint_says():
    for model_dtype in ("bfloat16", "float16", "float32", None):
        choice = choose_dtype("auto", CPU, model_dtype, cpu_flags=AVX2_ONLY)
        assert (choice.dtype, choice.name, choice.reason) == (
            torch.float32,
            "float32",
            NO_NATIVE_BF16,
        )
    # AVX-512 without its BF16 extension emulates bfloat16 too.
    assert choose_dtype("auto", CPU, None, cpu_flags=AVX2_ONLY | {"avx512f"}).name == "float32"
    # No /proc/cpuinfo (not Linux): nothing is known to run bfloat16 natively.
    assert choose_dtype("auto", CPU, None, cpu_flags=frozenset()).name == "float32"


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_an_explicit_dtype_wins_everywhere(name):
    for device, flags, bf16 in [
        (CPU, AVX2_ONLY, None),
        (CPU, frozenset({"amx_bf16"}), None),
        (CUDA, frozenset(), False),
        (CUDA, frozenset(), True),
    ]:
        choice = choose_dtype(name, device, "float32", cpu_flags=flags, cuda_bf16=bf16)
        assert (choice.dtype, choice.name, choice.reason) == (DTYPES[name], name, "requested")
        assert choice.describe() == f"{name} (requested)"


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        choose_dtype("int8", CPU, None, cpu_flags=AVX2_ONLY)


@pytest.mark.parametrize(
    "model_dtype, bf16, want",
    [
        ("bfloat16", True, "bfloat16"),
        ("bfloat16", False, "float16"),  # pre-Ampere: no native bfloat16
        ("float16", True, "float16"),
        ("float16", False, "float16"),
        ("float32", True, "float32"),  # the checkpoint's dtype, as before
        (None, True, "bfloat16"),  # the checkpoint names none
        (None, False, "float16"),
    ],
)
def test_auto_on_a_gpu_is_the_checkpoints_dtype_natively(model_dtype, bf16, want):
    choice = choose_dtype("auto", CUDA, model_dtype, cuda_bf16=bf16)
    assert choice.name == want and choice.dtype == DTYPES[want]
    assert choice.requested == "auto" and choice.reason
    if model_dtype == "bfloat16" and not bf16:
        assert "no native bfloat16" in choice.reason


def test_the_engine_config_runs_and_sizes_its_kv_cache_in_the_chosen_dtype(tiny_llama):
    model = ModelConfig.from_pretrained(tiny_llama)
    for dtype in ("auto", *DTYPES):
        config = EngineConfig(model=str(tiny_llama), dtype=dtype, device="cpu")
        choice = config.dtype_choice(model)
        assert choice == choose_dtype(dtype, CPU, model.torch_dtype)
        assert config.torch_dtype(model) == choice.dtype
        element = torch.empty((), dtype=choice.dtype).element_size()
        assert config.kv_block_bytes(model) == model.kv_elements_per_token * element * 16


def test_the_offline_engine_logs_its_choice(tiny_llama, caplog):
    from engine import LLM

    with caplog.at_level(logging.INFO, logger="splitserve"):
        llm = LLM(str(tiny_llama), kv_cache_bytes=2**20)
    want = llm.engine.config.dtype_choice(llm.engine.model_config)
    assert want.requested == "auto"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype: ")]
    assert lines == [f"dtype: {want.describe()}"]
    assert llm.engine.runner.dtype == want.dtype


def _proc_cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_this_machines_choice_follows_its_cpuinfo():
    flags = _proc_cpuinfo_flags()
    assert host_cpu_flags() == flags
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    choice = choose_dtype("auto", CPU, "float32")
    assert choice.name == ("bfloat16" if native else "float32")
    assert choice.reason == (NATIVE_BF16 if native else NO_NATIVE_BF16)
