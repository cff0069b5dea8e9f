"""What a benchmark run sends, and when: its requests, their arrival times,
and the options (--slo, --request-rate) that shape it.

Arrivals: all at once (rate inf), or a Poisson process at --request-rate
(--burstiness 1), burstier below 1 (gamma-distributed gaps, as vLLM).
Datasets: random (given input and output lengths), seed (~128-token prompts,
output lengths drawn from {32, 40, 50, 64, 80, 96, 200, 512}), interference
(mostly short chat turns, some long prompts: 1536 tokens by default).
Prompts are token ids, which OpenAI's completions API accepts, so lengths
are exact on any server.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

SEED_OUTPUT_LENS = (32, 40, 50, 64, 80, 96, 200, 512)
DATASETS = ("random", "seed", "interference")
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")


class BenchError(ValueError):
    """Bad options or an endpoint that cannot be benchmarked: one line for the user."""


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int


def make_dataset(
    name: str,
    num_prompts: int,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    long_fraction: float = 0.1,
    long_len: int = 1536,
    token_range: tuple[int, int] = (100, 1000),
) -> list[RequestSpec]:
    """The requests of one run, the same for the same arguments."""
    if num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {num_prompts}")
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if input_len < 1 or output_len < 1 or long_len < 1:
        raise BenchError("input, output and long-prompt lengths must be at least 1")
    if not 0 <= long_fraction <= 1:
        raise BenchError(f"--long-fraction must lie in [0, 1], got {long_fraction}")
    rng = random.Random(seed)
    lo, hi = token_range

    def prompt(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    specs = []
    for _ in range(num_prompts):
        if name == "random":
            specs.append(RequestSpec(prompt(input_len), output_len))
        elif name == "seed":
            n_in = max(1, int(rng.gauss(128, 16)))
            specs.append(RequestSpec(prompt(n_in), rng.choice(SEED_OUTPUT_LENS)))
        elif rng.random() < long_fraction:  # interference: a long document
            specs.append(RequestSpec(prompt(long_len), rng.randint(16, 64)))
        else:  # interference: a short chat turn
            specs.append(RequestSpec(prompt(rng.randint(32, 256)), rng.randint(32, 128)))
    return specs


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times, seconds from the start: all 0 at rate inf; otherwise gaps
    drawn from a gamma distribution with mean 1/rate (shape = burstiness:
    1 is a Poisson process, lower is burstier)."""
    if not rate > 0:
        raise BenchError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise BenchError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=0.5,tpot=0.05' (seconds; a value may end in ms) as a dict."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_METRICS:
            raise BenchError(
                f"bad --slo item {part!r}: expected NAME=SECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)} (e.g. ttft=0.5,tpot=50ms)"
            )
        value = value.strip()
        scale = 1e-3 if value.endswith("ms") else 1.0
        try:
            seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
        except ValueError:
            raise BenchError(f"bad --slo value {value!r} for {key}") from None
        if not seconds > 0:
            raise BenchError(f"--slo {key} must be > 0, got {value}")
        out[key] = seconds
    return out


def parse_rates(text: str) -> list[float]:
    """'inf' or '1,2,4' as request rates (requests per second)."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise BenchError(f"bad --request-rate {part!r}: a number or inf") from None
        if not rate > 0:
            raise BenchError(f"--request-rate must be > 0, got {part}")
        rates.append(rate)
    return rates


def check_context(specs: Sequence[RequestSpec], max_model_len: int | None) -> None:
    """Refuse, before the first request, a workload whose requests the server
    would turn away for their length."""
    if not max_model_len:
        return
    over = [s for s in specs if len(s.prompt) + s.max_tokens > max_model_len]
    if over:
        worst = max(over, key=lambda s: len(s.prompt) + s.max_tokens)
        raise BenchError(
            f"{len(over)} of {len(specs)} requests exceed the server's context length "
            f"{max_model_len} (the longest: {len(worst.prompt)} prompt + {worst.max_tokens} "
            "output tokens); lower --input-len, --output-len or --long-len"
        )
