"""The engine every worker runs: a paged, continuously batched Llama-family
engine. `from engine import LLM, SamplingParams` is the offline API."""

from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
