"""Turning logits into tokens, one row per request.

Random sampling uses the exponential-race form of the categorical draw:
argmax(p / E) with E ~ Exp(1) picks token i with probability p_i. The noise
for a seeded request comes from that request's own generator, so its tokens
depend on its seed alone, never on which other requests share the batch.

Logits go through vLLM's steps, in its order: logit_bias and min_tokens on
the raw logits, then the repetition, frequency and presence penalties, then
temperature, top-k and top-p. Only the rows of requests that set one of the
first four are touched by them, and a batch where none does takes the plain
path. Returned logprobs are of the raw logits (vLLM's default
"raw_logprobs" mode); a request with logprobs = N > 0 also gets the N most
likely tokens at each position, from the same log-softmax (one top-k over the
rows that want them), riding on its chosen token's logprob (TokenLogprob).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import cpu_kernels
from engine.outputs import TokenLogprob, TopLogprobs
from engine.request import Request


def sample(
    logits: torch.Tensor,  # [M, vocab] in the model's dtype, one row per request
    requests: Sequence[Request],
    eos_token_ids: Sequence[int] = (),
) -> list[tuple[int, float | None]]:
    """(token id, logprob of it or None) per row; the logprob is a
    TokenLogprob, with the top alternatives, for a request with logprobs > 0.
    eos_token_ids: the model's EOS ids, kept out of reach (with each
    request's stop_token_ids) until a request has generated min_tokens tokens."""
    params = [r.sampling_params for r in requests]
    want_logprobs = [p.logprobs is not None for p in params]
    adjusts = any(p.adjusts_logits for p in params)
    if not adjusts and not any(want_logprobs) and all(p.greedy for p in params):
        # The common case needs neither float32 logits nor a softmax: an
        # argmax in the logits' own dtype (3x faster than convert-then-max on
        # CPU at 64 x 32000; the same index, as bfloat16 widens exactly).
        return [(tok, None) for tok in cpu_kernels.argmax_rows(logits).tolist()]
    # A copy of our own where it will be adjusted in place.
    logits = logits.to(torch.float32, copy=adjusts)
    # Before any processing: logprobs are the model's own distribution.
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if adjusts:
        adjust_logits_(logits, requests, eos_token_ids)

    if all(p.greedy for p in params):
        tokens = cpu_kernels.argmax_rows(logits)
    else:
        tokens = _sample_mixed(logits, requests)

    token_list: list[int] = tokens.tolist()
    if logprobs is None:
        return [(tok, None) for tok in token_list]
    chosen: list[float] = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    tops = _top_logprobs(logprobs, [p.logprobs or 0 for p in params])
    out: list[tuple[int, float | None]] = []
    for i, tok in enumerate(token_list):
        top = tops[i]
        lp = chosen[i] if top is None else TokenLogprob(chosen[i], top)
        out.append((tok, lp if want_logprobs[i] else None))
    return out


def _top_logprobs(
    logprobs: torch.Tensor,  # [M, vocab] float32, the raw log-softmax
    counts: Sequence[int],  # per row: how many alternatives it wants (0: none)
) -> list[TopLogprobs | None]:
    """Each row's `counts[i]` most likely (token id, logprob), most likely
    first, from one top-k over the rows that want any; None for the others."""
    rows = [i for i, n in enumerate(counts) if n > 0]
    out: list[TopLogprobs | None] = [None] * len(counts)
    if not rows:
        return out
    k = min(max(counts[i] for i in rows), logprobs.shape[1])
    picked = logprobs if len(rows) == len(counts) else logprobs[rows]  # [R, vocab]
    values, ids = torch.topk(picked, k, dim=-1)  # [R, k] each, descending
    value_rows: list[list[float]] = values.tolist()
    id_rows: list[list[int]] = ids.tolist()
    for j, i in enumerate(rows):
        n = counts[i]
        out[i] = list(zip(id_rows[j][:n], value_rows[j][:n], strict=True))
    return out


def adjust_logits_(
    logits: torch.Tensor,  # [M, vocab] float32, changed in place
    requests: Sequence[Request],
    eos_token_ids: Sequence[int] = (),
) -> None:
    """Apply each request's min_tokens, logit_bias and penalties to its row
    (row i is requests[i]'s); rows of requests with none keep their values."""
    _mask_and_bias(logits, requests, eos_token_ids)
    _apply_penalties(logits, requests)


def _mask_and_bias(logits: torch.Tensor, requests: Sequence[Request], eos: Sequence[int]) -> None:
    """In place: -inf on EOS and stop tokens of the requests short of
    min_tokens, then each request's logit_bias added, as one scatter each."""
    vocab = logits.shape[1]
    mask_rows: list[int] = []
    mask_cols: list[int] = []
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    biases: list[float] = []
    for i, req in enumerate(requests):
        p = req.sampling_params
        if not p.adjusts_logits:
            continue
        if len(req.output_token_ids) < p.min_tokens:
            # Ids past the logits (a stop_token_id nobody checked against the
            # vocabulary) could never be sampled anyway.
            stops = [t for t in {*p.stop_token_ids, *eos} if t < vocab]
            mask_rows += [i] * len(stops)
            mask_cols += stops
        for tok, bias in p.logit_bias:
            if tok < vocab:  # the engine rejects larger ids; never index past the row
                bias_rows.append(i)
                bias_cols.append(tok)
                biases.append(bias)
    dev = logits.device
    if mask_cols:
        where = (torch.tensor(mask_rows, device=dev), torch.tensor(mask_cols, device=dev))
        logits.index_put_(where, torch.tensor(float("-inf"), device=dev))
    if biases:
        where = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_cols, device=dev))
        logits.index_put_(where, torch.tensor(biases, device=dev), accumulate=True)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """In place, on the rows whose request has a penalty: the repetition
    penalty (on the prompt's and output's tokens only), then frequency and
    presence (a pass over the vocabulary each, only where some row uses it)."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.penalizes]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[1]
    params = [requests[i].sampling_params for i in rows]
    stats = [_token_stats(requests[i], vocab, dev) for i in rows]
    whole = len(rows) == len(requests)
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    x = logits if whole else logits.index_select(0, idx)  # [P, vocab]

    if any(p.repetition_penalty != 1.0 for p in params):
        unseen = torch.zeros(vocab, dtype=torch.bool, device=dev)
        seen = torch.stack([s if s is not None else unseen for _, s in stats])  # [P, vocab]
        r, c = seen.nonzero(as_tuple=True)  # the few tokens it touches
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[r]
        v = x[r, c]
        x[r, c] = torch.where(v > 0, v / rep, v * rep)
    freq = [-p.frequency_penalty for p in params]
    pres = [-p.presence_penalty for p in params]
    if any(freq) or any(pres):
        counts = torch.stack([n for n, _ in stats])  # [P, vocab]
        if any(freq):
            x.addcmul_(counts, torch.tensor(freq, device=dev)[:, None])
        if any(pres):
            x.addcmul_(counts.clamp_(max=1.0), torch.tensor(pres, device=dev)[:, None])
    if not whole:
        logits.index_copy_(0, idx, x)


def _token_stats(
    request: Request, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The request's output token counts and (with a repetition penalty)
    seen-token mask, kept on the request and caught up with the output
    tokens added since the last step."""
    out = request.output_token_ids
    counts, seen = request.output_token_counts, request.seen_token_mask
    if counts is None or request.num_counted_output_tokens > len(out):
        counts = request.output_token_counts = torch.zeros(vocab, device=device)
        request.num_counted_output_tokens = 0
        if request.sampling_params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(request.prompt_token_ids, dtype=torch.long, device=device)] = True
            request.seen_token_mask = seen
    new = out[request.num_counted_output_tokens :]
    if len(new) == 1:  # the steady state: no index tensor to copy to the device
        counts[new[0]] += 1
        if seen is not None:
            seen[new[0]] = True
    elif new:
        ids = torch.tensor(new, dtype=torch.long, device=device)
        counts.index_put_((ids,), torch.ones(len(new), device=device), accumulate=True)
        if seen is not None:
            seen[ids] = True
    request.num_counted_output_tokens = len(out)
    return counts, seen


def _sample_mixed(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    params = [r.sampling_params for r in requests]
    device = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    scaled = logits / temps[:, None]
    scaled = _apply_top_k_top_p(scaled, [p.top_k for p in params], [p.top_p for p in params])
    probs = torch.softmax(scaled, dim=-1)

    tokens = cpu_kernels.argmax_rows(logits)  # the greedy rows'; the others are drawn below
    unseeded = [i for i, p in enumerate(params) if not p.greedy and p.seed is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=device)
        tokens[rows] = _draw_by_inverse_cdf(probs[rows])
    for i, req in enumerate(requests):
        seed = req.sampling_params.seed
        if seed is None or req.sampling_params.greedy:
            continue
        # A seeded request draws from its own generator, one exponential per
        # vocabulary entry and step (the exponential race: argmax p / E is a
        # draw from p), so its tokens depend on its seed alone, whatever the
        # batch, and a decode worker can skip the prefill worker's draw
        # (skip_sample).
        if req.generator is None:
            req.generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.empty(probs.shape[1], device=device).exponential_(generator=req.generator)
        tokens[i] = torch.argmax(probs[i] / noise)
    return tokens


def _draw_by_inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of `probs` from the global RNG: one uniform number
    per row against the row's cumulative sum. The exponential race over the
    whole vocabulary needs a random number per entry; on CPU, drawing those
    took 17 ms for 16 rows of 32,000 (more than the model's step), this
    0.2 ms. A token of probability 0 (cut by top-k/top-p) is never drawn:
    its cumulative sum equals the one before it."""
    cdf = probs.to(torch.float32).cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u rounded up to the total: take the likeliest token instead of running off the end.
    past = drawn >= probs.shape[1]
    if bool(past.any()):
        drawn = torch.where(past, probs.argmax(dim=-1), drawn)
    return drawn


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= torch.tensor(ks, device=logits.device)[:, None]
    # top-p: drop a token when the mass strictly before it already reaches p,
    # so the most likely token always survives.
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def skip_sample(request: Request, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded request's generator past one token that was sampled
    elsewhere with the same seed (the first token, on a prefill worker), so
    the tokens after it are those a single engine would have drawn."""
    params = request.sampling_params
    if params.seed is None or params.greedy:
        return
    if request.generator is None:
        request.generator = torch.Generator(device=device).manual_seed(params.seed)
    torch.empty(vocab_size, device=device).exponential_(generator=request.generator)
