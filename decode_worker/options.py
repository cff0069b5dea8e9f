"""The decode worker's own limits and policies, and the command-line options
behind them (the engine's are EngineConfig's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """The decode worker's own limits and policies (the engine's are EngineConfig)."""

    kv_reservation_ttl_s: float = 120.0  # a reservation's KV must arrive within this
    # How long a request waits for room in the KV cache before the worker
    # answers RESOURCE_EXHAUSTED (the router then tries another worker or 503).
    kv_reservation_wait_s: float = 30.0
    stream_interval: int = 1  # tokens per message after the first
    # Queue bound, beyond which Generate answers RESOURCE_EXHAUSTED at once
    # (0 = unbounded): requests queued here, and their prompt tokens not yet computed.
    max_waiting_requests: int = 256
    max_waiting_prompt_tokens: int = 1 << 18
    # A prefill that fails after the first token went out: "recompute" the
    # prompt here and go on, or "fail" the request.
    kv_failure_policy: str = "recompute"

    @classmethod
    def from_args(cls, args: Any) -> DecodeOptions:
        return cls(
            kv_reservation_ttl_s=args.kv_reservation_ttl,
            kv_reservation_wait_s=args.kv_reservation_wait,
            stream_interval=max(1, args.stream_interval),
            max_waiting_requests=args.max_waiting_requests,
            max_waiting_prompt_tokens=args.max_waiting_prompt_tokens,
            kv_failure_policy=args.kv_failure_policy,
        )


def add_decode_args(p: Any) -> None:
    """The command-line options behind DecodeOptions."""
    d = DecodeOptions()
    p.add_argument(
        "--kv-reservation-ttl",
        type=float,
        default=d.kv_reservation_ttl_s,
        help="seconds a KV reservation waits for its prefill (renewed while the KV arrives) "
        "before it expires and the prompt is prefilled here instead",
    )
    p.add_argument(
        "--kv-reservation-wait",
        type=float,
        default=d.kv_reservation_wait_s,
        help="seconds a request waits for room in a full KV cache before the worker refuses "
        "it (the router then tries another worker, or answers 503)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=d.stream_interval,
        help="send tokens to the router every N tokens (the first at once); >1 trades "
        "streaming granularity for throughput",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=d.max_waiting_requests,
        help="requests queued here beyond which new ones are refused at once (the router "
        "answers 503 with Retry-After); 0: no bound",
    )
    p.add_argument(
        "--max-waiting-prompt-tokens",
        type=int,
        default=d.max_waiting_prompt_tokens,
        help="queued prompt tokens not yet computed beyond which new requests are refused "
        "at once; 0: no bound",
    )
    p.add_argument(
        "--kv-failure-policy",
        choices=("recompute", "fail"),
        default=d.kv_failure_policy,
        help="when the prefill worker fails after the first token: recompute the prompt here "
        "and go on (default), or end the request with an error",
    )
