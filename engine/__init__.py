"""The engine every worker runs: a paged, continuously batched Llama-family
engine. `from engine import LLM, SamplingParams` is the offline API.

The names are imported on first use: the router imports engine modules that
need no torch (configs, sampling parameters, the detokenizer) and must not
pay torch's import for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]

_HOMES = {
    "LLM": "engine.llm",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
