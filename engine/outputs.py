"""What the engine gives back for a finished request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    logprobs: list[float] | None  # of each generated token, when requested
    num_preemptions: int
    # time.monotonic() seconds
    arrival_time: float
    scheduled_time: float | None  # first admitted to the batch
    first_token_time: float | None
    finish_time: float

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
