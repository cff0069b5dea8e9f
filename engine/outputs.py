"""What the engine gives back: a finished request, and (through AsyncEngine)
new tokens, per-step figures and its load."""

from __future__ import annotations

from dataclasses import dataclass

# (token id, logprob) of the most likely tokens at one position, most likely first.
TopLogprobs = list[tuple[int, float]]


class TokenLogprob(float):
    """A sampled token's logprob that also carries the `top` most likely
    tokens at its position (as many as the request's `logprobs` asks for).

    It is a float, so it travels wherever a chosen token's logprob does
    (sampler -> scheduler -> Request.output_logprobs -> RequestOutput and
    TokenDelta) with nothing on the way knowing about the alternatives; read
    them back with `top_of`. Requests with `logprobs=0` get plain floats."""

    __slots__ = ("top",)
    top: TopLogprobs

    def __new__(cls, value: float, top: TopLogprobs) -> TokenLogprob:
        self = super().__new__(cls, value)
        self.top = top
        return self


def top_of(logprob: float) -> TopLogprobs:
    """The alternatives a logprob carries; [] for a plain float (logprobs=0,
    or a placeholder for a token sampled elsewhere)."""
    return logprob.top if isinstance(logprob, TokenLogprob) else []


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    # Of each generated token, when requested; with logprobs > 0 each is a
    # TokenLogprob carrying its position's top alternatives (see top_logprobs).
    logprobs: list[float] | None
    num_preemptions: int
    # time.monotonic() seconds
    arrival_time: float
    scheduled_time: float | None  # first admitted to the batch
    first_token_time: float | None
    finish_time: float
    # Prompt tokens whose KV came from the prefix cache, not computed.
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs, one per prompt token: its logprob
    # given the tokens before it (None for the first), a TokenLogprob with
    # alternatives when prompt_logprobs > 0 (see prompt_top_logprobs). None
    # when not asked for, or when the prompt was scored elsewhere (the KV came
    # from another engine) or before (a resumed request).
    prompt_logprobs: list[float | None] | None = None

    @property
    def prompt_top_logprobs(self) -> list[TopLogprobs | None] | None:
        """Parallel to `prompt_logprobs`: each prompt token's most likely
        alternatives (None for the first, empty lists for prompt_logprobs=0)."""
        if self.prompt_logprobs is None:
            return None
        return [None if lp is None else top_of(lp) for lp in self.prompt_logprobs]

    @property
    def top_logprobs(self) -> list[TopLogprobs] | None:
        """Parallel to `logprobs`: at each position, the `logprobs` most likely
        tokens, most likely first (empty lists for logprobs=0)."""
        if self.logprobs is None:
            return None
        return [top_of(lp) for lp in self.logprobs]

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float:
        """Arrival to finish, seconds."""
        return self.finish_time - self.arrival_time

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM's shape (`out.outputs[0].text`), for code written against it."""
        return [self]


@dataclass(slots=True)
class TokenDelta:
    """New tokens of one request since its previous delta (AsyncEngine)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finished: RequestOutput | None = None  # set on the request's last delta
    error: str | None = None  # the engine failed; the request is over
    # The request's prompt_logprobs (RequestOutput's), on the delta that
    # carries its first token when that token was sampled by this engine.
    prompt_logprobs: list[float | None] | None = None

    @property
    def top_logprobs(self) -> list[TopLogprobs]:
        """Parallel to `logprobs`: each token's most likely alternatives
        (empty lists for logprobs=0)."""
        return [top_of(lp) for lp in self.logprobs]


@dataclass(slots=True)
class StepResult:
    """What one LLMEngine iteration did, as its driver (AsyncEngine) needs it."""

    finished: list[RequestOutput]
    num_scheduled: int  # requests computed in the step; 0: nothing could run
    # Finished requests whose blocks stay held for a KV transfer: their
    # block tables, known before their last output goes out.
    held: dict[str, list[int]]


@dataclass(slots=True)
class StepInfo:
    """One engine iteration, for the worker's metrics (called on the engine thread)."""

    duration_s: float
    num_scheduled: int  # requests computed in the step (the batch)
    num_running: int
    num_waiting: int


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's load, refreshed after every step and command; read without locks."""

    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    running: int = 0
    waiting: int = 0
    waiting_prompt_tokens: int = 0
    awaiting_kv: int = 0
    held: int = 0
    num_steps: int = 0
    mean_batch_size: float = 0.0
    num_preemptions: int = 0
    # Prompt tokens looked up in the prefix cache, and found (since start).
    prefix_queries: int = 0
    prefix_hits: int = 0

    @property
    def kv_usage(self) -> float:
        total = self.kv_blocks_total
        return (total - self.kv_blocks_free) / total if total else 0.0
