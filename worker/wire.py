"""Conversions between the wire messages and the engine's types, shared by
the router and both workers so each field is mapped in exactly one place.
Needs no torch: the router imports it."""

from __future__ import annotations

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
