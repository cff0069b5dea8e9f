"""What a benchmark run sends, and when: its requests, their arrival times,
and the options (--slo, --request-rate) that shape it.

Arrivals: all at once (rate inf), or a Poisson process at --request-rate
(--burstiness 1), burstier below 1 (gamma-distributed gaps, as vLLM).
Datasets: random (given input and output lengths), seed (~128-token prompts,
output lengths drawn from {32, 40, 50, 64, 80, 96, 200, 512}), interference
(mostly short chat turns, some long prompts: 1536 tokens by default),
prefix (a few long shared "system prompts", each request one of them and a
distinct suffix: vLLM's prefix_repetition), multiturn (conversations whose
every turn resends the whole history, so each prompt extends the last).
Prompts are token ids, which OpenAI's completions API accepts, so lengths
are exact on any server.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

SEED_OUTPUT_LENS = (32, 40, 50, 64, 80, 96, 200, 512)
DATASETS = ("random", "seed", "interference", "prefix", "multiturn")
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")


class BenchError(ValueError):
    """Bad options or an endpoint that cannot be benchmarked: one line for the user."""


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    # The index of an earlier request that must finish before this one is
    # sent: a conversation's next turn cannot be asked before the last answer.
    after: int | None = None


def make_dataset(
    name: str,
    num_prompts: int,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    long_fraction: float = 0.1,
    long_len: int = 1536,
    token_range: tuple[int, int] = (100, 1000),
    prefix_count: int = 4,
    prefix_len: int = 1024,
    suffix_len: int = 64,
    conversations: int = 8,
    turns: int = 4,
    turn_len: int = 64,
) -> list[RequestSpec]:
    """The requests of one run, the same for the same arguments. multiturn
    has conversations x turns requests whatever num_prompts says."""
    if num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {num_prompts}")
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if input_len < 1 or output_len < 1 or long_len < 1:
        raise BenchError("input, output and long-prompt lengths must be at least 1")
    if not 0 <= long_fraction <= 1:
        raise BenchError(f"--long-fraction must lie in [0, 1], got {long_fraction}")
    for flag, value in (
        ("--prefix-count", prefix_count),
        ("--prefix-len", prefix_len),
        ("--suffix-len", suffix_len),
        ("--conversations", conversations),
        ("--turns", turns),
        ("--turn-len", turn_len),
    ):
        if value < 1:
            raise BenchError(f"{flag} must be at least 1, got {value}")
    rng = random.Random(seed)
    if name == "prefix":
        prefixes = _distinct(rng, token_range, prefix_count, prefix_len, "prefixes", "--prefix-len")
        suffixes = _distinct(rng, token_range, num_prompts, suffix_len, "suffixes", "--suffix-len")
        # Dealt evenly, then shuffled (as vLLM's prefix_repetition): each
        # prefix is reused equally often (+-1), in no predictable order.
        which = [i % prefix_count for i in range(num_prompts)]
        rng.shuffle(which)
        return [RequestSpec(prefixes[p] + suffixes[i], output_len) for i, p in enumerate(which)]
    if name == "multiturn":
        return _multiturn(rng, token_range, output_len, conversations, turns, turn_len)
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


def _distinct(
    rng: random.Random,
    token_range: tuple[int, int],
    count: int,
    length: int,
    what: str,
    flag: str,
) -> list[list[int]]:
    """`count` different random prompts of `length` tokens: a repeated suffix
    would be a whole-prompt cache hit, a repeated prefix one prefix fewer."""
    lo, hi = token_range
    if (hi - lo) ** length < count:
        raise BenchError(f"{count} distinct {length}-token {what} cannot exist: raise {flag}")
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    while len(out) < count:
        tokens = [rng.randrange(lo, hi) for _ in range(length)]
        if tuple(tokens) not in seen:
            seen.add(tuple(tokens))
            out.append(tokens)
    return out


def _multiturn(
    rng: random.Random,
    token_range: tuple[int, int],
    output_len: int,
    conversations: int,
    turns: int,
    turn_len: int,
) -> list[RequestSpec]:
    """Turn-major: every conversation's first turn, then every second turn,
    and so on, each turn `after` its conversation's previous one. A client
    that ignores `after` still sends each conversation's turns in order."""
    lo, hi = token_range

    def tokens(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    history: list[list[int]] = [[] for _ in range(conversations)]
    specs = []
    for t in range(turns):
        for c in range(conversations):
            if t:
                # The real answer is unknown when the workload is made; a
                # stand-in as long (EOS is ignored) keeps the lengths true,
                # though a prefix cache then finds the last prompt, not its answer.
                history[c] = history[c] + tokens(output_len)
            history[c] = history[c] + tokens(turn_len)
            after = (t - 1) * conversations + c if t else None
            specs.append(RequestSpec(history[c], output_len, after))
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
            "output tokens); lower --output-len or the prompts' lengths (--input-len, "
            "--long-len; prefix: --prefix-len, --suffix-len; multiturn: --turns, --turn-len)"
        )
