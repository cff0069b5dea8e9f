"""Token ids in, text out, never past a stop string.

The decode worker checks stop strings too and finishes the request at the
token that completes one; the router checks them again on its own text so
that no character past a stop string ever reaches the client, even when the
worker's text and the router's disagree or the worker is late to stop.

While the request runs, the last (longest stop string - 1) characters are
held back: a stop string could still be completing across them. They are
released once more text proves they are not part of a stop string, or at the
end. A stop string found is cut off with everything after it.

The final text equals what the offline engine returns for the same tokens:
the incremental text cut at the stop string when one ended the request, else
`tokenizer.decode(token_ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.detokenizer import IncrementalDetokenizer, find_stop


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One sampled token, for the logprobs fields of a response."""

    token_id: int
    text: str  # the token decoded on its own
    logprob: float | None  # None if the worker sent none, or for the first prompt token (echo)
    # Where the text this token completed starts, in the response's text
    # (the echoed prompt's, then the output's).
    offset: int
    # The most likely tokens at this position, most likely first, each
    # decoded on its own: (text, logprob); empty unless logprobs > 0.
    top: tuple[tuple[str, float], ...] = ()


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token decoded on its own, as the logprobs fields show it."""
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


def prompt_token_infos(
    tokenizer: Any,
    prompt_ids: Sequence[int],
    scored: Sequence[tuple[float, Sequence[tuple[int, float]]]] | None,
    text: str,
) -> list[TokenInfo]:
    """The logprob entries of an echoed prompt: one per prompt token, each
    decoded on its own as the generated ones are; `scored` gives (logprob,
    alternatives) of prompt tokens 1..n-1 (the first has no logprob: nothing
    precedes it), None when the worker sent none. Offsets are where each
    token's text starts in the prompt's (`text`, the echo), decoded
    incrementally as the output's are."""
    memo: dict[int, str] = {}  # a long prompt repeats its tokens and their alternatives

    def decoded(token_id: int) -> str:
        if token_id not in memo:
            memo[token_id] = token_text(tokenizer, token_id)
        return memo[token_id]

    detok = IncrementalDetokenizer(tokenizer)
    out = []
    for i, token_id in enumerate(prompt_ids):
        offset = min(len(detok.text), len(text))
        detok.push(token_id)
        logprob: float | None = None
        top: tuple[tuple[str, float], ...] = ()
        if i > 0 and scored is not None and i - 1 < len(scored):
            logprob, alternatives = scored[i - 1]
            top = tuple((decoded(t), lp) for t, lp in alternatives)
        out.append(TokenInfo(token_id, decoded(token_id), logprob, offset, top))
    return out


class TextAssembler:
    """One request's output text, built token by token (O(1) work per token)."""

    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...],
        *,
        logprobs: bool,
        min_tokens: int = 0,
        offset_base: int = 0,
    ) -> None:
        """offset_base: characters the response's text holds before the
        output (the echoed prompt), added to every token's offset."""
        self.tokenizer = tokenizer
        self.offset_base = offset_base
        self.stop = stop
        self.min_tokens = min_tokens  # no stop string ends the text before this many tokens
        self.hold = max(0, max((len(s) for s in stop), default=0) - 1)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.stop_string: str | None = None  # set once a stop string ended the text
        self.want_logprobs = logprobs
        self._emitted = 0  # characters of text already handed out
        self._tokens: list[TokenInfo] = []  # logprob entries not yet handed out
        self.cumulative_logprob = 0.0  # over the tokens pushed that carried one

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(
        self,
        token_id: int,
        logprob: float | None,
        top: Sequence[tuple[int, float]] = (),
        *,
        check_stop: bool = True,
    ) -> None:
        """Add one generated token, with the (token id, logprob) of the most
        likely tokens at its position when they were asked for. `check_stop`
        False for a token that itself ended the request (EOS or a stop token):
        the engine matches no stop string on it, and neither may the router,
        or their texts would differ."""
        assert not self.stopped, "no tokens after a stop string"
        offset = self.offset_base + len(self.detok.text)
        self.token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
        new = self.detok.push(token_id)
        if self.want_logprobs:
            text = self._token_text(token_id)
            alternatives = tuple((self._token_text(t), lp) for t, lp in top)
            self._tokens.append(TokenInfo(token_id, text, logprob, offset, alternatives))
        if new and check_stop and self.stop and len(self.token_ids) > self.min_tokens:
            hit = find_stop(self.detok.text, len(new), self.stop)
            if hit is not None:
                # Hold-back keeps the cut at or after what was emitted: the
                # stop string began at most `hold` characters before `new`.
                self.detok.text = self.detok.text[: hit[0]]
                self.stop_string = hit[1]

    def _token_text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id)

    def take(self) -> tuple[str, list[TokenInfo]]:
        """The text safe to send now, and the logprob entries since the last take."""
        text = self.detok.text
        end = len(text) if self.stopped else max(self._emitted, len(text) - self.hold)
        delta = text[self._emitted : end]
        self._emitted = end
        tokens, self._tokens = self._tokens, []
        return delta, tokens

    def finish(self, worker_stop_string: str | None = None) -> tuple[str, list[TokenInfo]]:
        """The request ended: the rest of the text and logprob entries. After
        this, `text` is the whole output."""
        sent = self.detok.text[: self._emitted]
        if self.stopped:
            final = self.detok.text
        else:
            final = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
            if worker_stop_string:
                # The worker saw a stop string the router's text did not (it
                # cannot, with the same tokenizer): still never send past it.
                cut = final.find(worker_stop_string, len(sent))
                if cut != -1:
                    final = final[:cut]
                    self.stop_string = worker_stop_string
            if not final.startswith(sent):
                # A tokenizer whose windowed decode differs from the whole one:
                # what was sent stands, so keep to the incremental text.
                final = self.detok.text
        self.detok.text = final
        self._emitted = max(self._emitted, len(final))
        tokens, self._tokens = self._tokens, []
        return final[len(sent) :], tokens

    @property
    def text(self) -> str:
        return self.detok.text
