"""Conversions between the wire messages and the engine's types, shared by
the router and both workers so each field is mapped in exactly one place.
Needs no torch: the router imports it."""

from __future__ import annotations

from collections.abc import Sequence

from engine.outputs import TopLogprobs, top_of
from engine.sampling_params import GuidedSpec, SamplingParams
from protos import splitserve_pb2 as pb


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_tokens=p.max_tokens,
        ignore_eos=p.ignore_eos,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        min_tokens=p.min_tokens,
        logit_bias=dict(p.logit_bias),
    )
    if p.structured_output is not None:
        msg.structured_output.kind = p.structured_output.kind
        msg.structured_output.spec = p.structured_output.spec
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    return msg


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError for parameters the engine rejects."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        max_tokens=msg.max_tokens,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        seed=msg.seed if msg.HasField("seed") else None,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        min_tokens=msg.min_tokens,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        structured_output=(
            GuidedSpec(msg.structured_output.kind, msg.structured_output.spec)
            if msg.structured_output.kind
            else None
        ),
    )


def prompt_logprobs_to_pb(entries: Sequence[float | None]) -> pb.PromptLogprobs:
    """An engine's prompt_logprobs (entry 0, None, is not sent)."""
    scored = [lp for lp in entries[1:] if lp is not None]
    assert len(scored) == len(entries) - 1, "only the first prompt token has no logprob"
    msg = pb.PromptLogprobs(logprobs=scored)
    tops = [top_of(lp) for lp in scored]
    if any(tops):  # prompt_logprobs > 0
        msg.top_logprobs.extend(
            pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
            for top in tops
        )
    return msg


def prompt_logprobs_from_pb(msg: pb.PromptLogprobs) -> list[tuple[float, TopLogprobs]]:
    """(logprob, alternatives) of prompt tokens 1..n-1."""
    tops = [list(zip(t.token_ids, t.logprobs, strict=True)) for t in msg.top_logprobs]
    if not tops:
        tops = [[] for _ in msg.logprobs]
    return list(zip(msg.logprobs, tops, strict=True))
